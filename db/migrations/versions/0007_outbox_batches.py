"""outbox batches

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

`email_messages.batch_id` names the provider request a message was claimed into (one
`POST /emails/batch` for up to 100 messages): the members of a batch are claimed together, and
a retry after a timeout or a crash resends the same members, built from their stored rows,
under the same `Idempotency-Key` (`batch/<batch_id>`). `claimed_by` names the worker process
(`host:pid`) whose send is in flight, so a later claim recognises a dead claimer from its
missing heartbeat instead of waiting out the lease; NULL once that send has ended.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "email_messages", sa.Column("batch_id", postgresql.UUID(as_uuid=True), nullable=True)
    )
    op.add_column("email_messages", sa.Column("claimed_by", sa.Text(), nullable=True))
    # A reclaim locks every member of a batch by its id. CONCURRENTLY: a plain CREATE INDEX
    # would block every write to a big outbox (sends, webhooks) while it builds. It cannot run
    # in a transaction, so the columns above commit first; should the build fail, it leaves an
    # INVALID index to drop by hand (`DROP INDEX CONCURRENTLY ix_email_messages_batch_id`).
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_email_messages_batch_id",
            "email_messages",
            ["batch_id"],
            unique=False,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_email_messages_batch_id",
            table_name="email_messages",
            postgresql_concurrently=True,
        )
    op.drop_column("email_messages", "claimed_by")
    op.drop_column("email_messages", "batch_id")

"""index the outbox rows still open, for the reconciler

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10

`send_email` and welcome emails are written `pending` at enqueue, and the minutely
`reconcile_jobs` looks for open ones whose job Redis lost. The outbox keeps every email ever
sent, so without this partial index that scan would read the whole table every minute; with
it, it reads only the rows not yet settled.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_email_messages_open",
        "email_messages",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'sending')"),
    )


def downgrade() -> None:
    op.drop_index("ix_email_messages_open", table_name="email_messages")

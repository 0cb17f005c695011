"""outbox headers and waitlist confirmation

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

`email_messages.headers` keeps a message's extra header fields with its stored body, so a
campaign step resent after a crash carries the same `List-Unsubscribe` it was first drafted
with. `waitlist_entries.confirmed_at` records the double opt-in (WAITLIST_CONFIRM); entries
that exist before this revision signed up without one and are taken as confirmed at sign-up,
so their campaign goes on unchanged; a row inserted without it (SQL, not `join_waitlist`) is
confirmed when inserted.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("email_messages", sa.Column("headers", postgresql.JSONB(), nullable=True))
    op.add_column(
        "waitlist_entries",
        sa.Column(
            "confirmed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=True,
        ),
    )
    op.execute("UPDATE waitlist_entries SET confirmed_at = created_at")
    # The hourly tick deletes entries left unconfirmed: it scans only those.
    op.create_index(
        "ix_waitlist_unconfirmed",
        "waitlist_entries",
        ["created_at"],
        unique=False,
        postgresql_where=sa.text("confirmed_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_waitlist_unconfirmed", table_name="waitlist_entries")
    op.drop_column("waitlist_entries", "confirmed_at")
    op.drop_column("email_messages", "headers")

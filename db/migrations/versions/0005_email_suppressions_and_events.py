"""email suppressions, provider webhook events, and the outbox status `suppressed`

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-20

`email_suppressions` holds one row per address (stored lower-cased, so the outbox claim finds
it with one index lookup whatever case the email was written in). `email_events` keeps each
signed provider webhook event once: the unique (provider, event_id) turns a replay into a
no-op. An outbox row whose recipient is suppressed settles `suppressed`, never sent.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('pending', 'sending', 'sent', 'failed', 'review')"
NEW_STATUSES = "status IN ('pending', 'sending', 'sent', 'failed', 'review', 'suppressed')"


def upgrade() -> None:
    op.drop_constraint("status_known", "email_messages", type_="check")
    op.create_check_constraint("status_known", "email_messages", NEW_STATUSES)
    op.create_table(
        "email_suppressions",
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "reason IN ('bounce', 'complaint', 'unsubscribe', 'manual')", name="reason_known"
        ),
        sa.CheckConstraint("email = lower(email)", name="email_lower_case"),
        sa.PrimaryKeyConstraint("email"),
    )
    op.create_table(
        "email_events",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column(
            "payload", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("provider IN ('resend', 'sendgrid')", name="provider_known"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "uq_email_events_provider_event", "email_events", ["provider", "event_id"], unique=True
    )


def downgrade() -> None:
    op.drop_index("uq_email_events_provider_event", table_name="email_events")
    op.drop_table("email_events")
    op.drop_table("email_suppressions")
    # Kept settled (never resent) under a status the old constraint knows.
    op.execute(
        "UPDATE email_messages SET status = 'failed', last_error = 'suppressed' "
        "WHERE status = 'suppressed'"
    )
    op.drop_constraint("status_known", "email_messages", type_="check")
    op.create_check_constraint("status_known", "email_messages", OLD_STATUSES)

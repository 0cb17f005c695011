"""import lease: who runs an import, until when

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

Imports used to exclude each other with a session advisory lock held across batches, which
PgBouncer in transaction pooling mode cannot keep (the session is not the client's between
transactions). The lease lives on the job row instead (jobs/imports/lease.py): `lease_owner`
names the run that holds it, `lease_expires_at` (PostgreSQL's clock) says when another run may
take it over. Both NULL: nobody runs the import.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("contact_import_jobs", sa.Column("lease_owner", sa.Text(), nullable=True))
    op.add_column(
        "contact_import_jobs",
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("contact_import_jobs", "lease_expires_at")
    op.drop_column("contact_import_jobs", "lease_owner")

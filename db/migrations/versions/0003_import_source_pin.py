"""contact_import_jobs: pin the source and remember its encoding

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

A resume skips `processed_rows` rows of a fresh read of the source, so it must read the same
bytes: `source_pin` records the file (inode, size, mtime) or the S3 object (ETag) at its first
read, and every later read checks it. `source_encoding` keeps the first run's whole-file
encoding decision (a late invalid UTF-8 byte makes it Windows-1252), which a resume that skips
the counting pass could not make again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("contact_import_jobs", sa.Column("source_pin", sa.Text(), nullable=True))
    op.add_column("contact_import_jobs", sa.Column("source_encoding", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("contact_import_jobs", "source_encoding")
    op.drop_column("contact_import_jobs", "source_pin")

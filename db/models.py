"""SQLAlchemy 2.0 models of every table (CONTRACT §7).

Every column a caller does not name has a server default, so plain SQL inserts such as
`INSERT INTO contacts (user_id, email) VALUES (...)` work from any client, not just this ORM.
Case-insensitive uniqueness (emails, company names) lives in expression indexes on `lower(...)`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# One Literal per column: the model's type, the client's pydantic types (worker/client.py), the
# CHECK constraints below and the console's filters all read it. The constraints in a migrated
# database must allow exactly these values (tests/foundation/test_migrations.py), so a new
# status comes with a migration.
ImportStatusName = Literal["pending", "processing", "completed", "failed", "cancelled"]
ExportStatusName = Literal["pending", "processing", "completed", "failed"]
ExportKind = Literal["contacts", "companies"]
EmailStatusName = Literal["pending", "sending", "sent", "failed", "review", "suppressed"]
IMPORT_STATUSES: tuple[ImportStatusName, ...] = get_args(ImportStatusName)
EXPORT_STATUSES: tuple[ExportStatusName, ...] = get_args(ExportStatusName)
EXPORT_KINDS: tuple[ExportKind, ...] = get_args(ExportKind)
EMAIL_STATUSES: tuple[EmailStatusName, ...] = get_args(EmailStatusName)
# An import or export row a worker may still run (reconcile, fair sharing).
OPEN_STATUSES: tuple[Literal["pending", "processing"], ...] = ("pending", "processing")
# An import in one of these has ended: nothing changes it again (its job, its event streams).
ENDED_IMPORT_STATUSES: frozenset[ImportStatusName] = frozenset({"completed", "failed", "cancelled"})
# CONTRACT §13: bounce, complaint and manual stop all email to the address; unsubscribe only
# campaign email (jobs/email/suppression.py decides which email is which).
SuppressionReason = Literal["bounce", "complaint", "unsubscribe", "manual"]
EmailEventProvider = Literal["resend", "sendgrid"]
SUPPRESSION_REASONS: tuple[SuppressionReason, ...] = get_args(SuppressionReason)
EMAIL_EVENT_PROVIDERS: tuple[EmailEventProvider, ...] = get_args(EmailEventProvider)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """A CHECK constraint's text, spelt as migration 0001 spells it: `status IN ('a', 'b')`."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(
        UUID(as_uuid=True), primary_key=True, server_default=func.gen_random_uuid()
    )


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), onupdate=func.now())


def _counter() -> Mapped[int]:
    return mapped_column(Integer, server_default="0")


def _user_fk() -> Mapped[uuid.UUID]:
    return mapped_column(UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"))


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB}  # noqa: RUF012 (SQLAlchemy's documented API)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str | None] = mapped_column(Text)
    plan: Mapped[str] = mapped_column(Text, server_default="trial")
    trial_ends_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=text("now() + interval '14 days'")
    )
    created_at: Mapped[datetime] = _created_at()


class Company(Base):
    __tablename__ = "companies"
    __table_args__ = (
        Index("uq_companies_user_lower_name", "user_id", func.lower(text("name")), unique=True),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    name: Mapped[str] = mapped_column(Text)
    domain: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class Contact(Base):
    __tablename__ = "contacts"
    __table_args__ = (
        Index("uq_contacts_user_lower_email", "user_id", func.lower(text("email")), unique=True),
        Index("ix_contacts_company_id", "company_id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    email: Mapped[str] = mapped_column(Text)
    first_name: Mapped[str | None] = mapped_column(Text)
    last_name: Mapped[str | None] = mapped_column(Text)
    phone: Mapped[str | None] = mapped_column(Text)
    company_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("companies.id", ondelete="SET NULL")
    )
    job_title: Mapped[str | None] = mapped_column(Text)
    city: Mapped[str | None] = mapped_column(Text)
    country: Mapped[str | None] = mapped_column(Text)
    linkedin_url: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class ContactImportJob(Base):
    __tablename__ = "contact_import_jobs"
    __table_args__ = (CheckConstraint(_one_of("status", IMPORT_STATUSES), name="status_known"),)

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    file_path: Mapped[str] = mapped_column(Text)
    status: Mapped[ImportStatusName] = mapped_column(Text, server_default="pending")
    total_rows: Mapped[int | None] = mapped_column(Integer)
    processed_rows: Mapped[int] = _counter()
    # The batch after `processed_rows` is merged in email-hash parts, one transaction each:
    # `batch_rows` (that batch's data rows) and `batch_parts_done` (a bitmask of its committed
    # parts) let a resumed run redo only the missing parts. Both reset when the batch is whole.
    batch_rows: Mapped[int | None] = mapped_column(Integer)
    batch_parts_done: Mapped[int] = _counter()
    # What the first read saw (`jobs.imports.sources`: inode/size/mtime or the S3 ETag) and the
    # encoding the first run chose for the whole file: a resume reads the same bytes the same
    # way, or fails. Both stay NULL until the job first opens the source.
    source_pin: Mapped[str | None] = mapped_column(Text)
    source_encoding: Mapped[str | None] = mapped_column(Text)
    error_count: Mapped[int] = _counter()
    created_count: Mapped[int] = _counter()
    updated_count: Mapped[int] = _counter()
    message: Mapped[str | None] = mapped_column(Text)
    # Set by `JobsClient.cancel_import`; the running job stops at its next batch boundary.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default="false")
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The run that owns the import and until when (jobs/imports/lease.py); NULL: nobody.
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ContactImportError(Base):
    __tablename__ = "contact_import_errors"
    __table_args__ = (
        # One detail row per CSV record: a re-run after a crash inserts nothing twice.
        Index("uq_import_errors_job_row", "job_id", "row_number", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("contact_import_jobs.id", ondelete="CASCADE")
    )
    row_number: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")


class Export(Base):
    __tablename__ = "exports"
    __table_args__ = (
        CheckConstraint(_one_of("status", EXPORT_STATUSES), name="status_known"),
        CheckConstraint(_one_of("kind", EXPORT_KINDS), name="kind_known"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    kind: Mapped[ExportKind] = mapped_column(Text)
    status: Mapped[ExportStatusName] = mapped_column(Text, server_default="pending")
    # False: every row of the user; True: only the ids listed in export_items.
    has_selection: Mapped[bool] = mapped_column(Boolean, server_default="false")
    row_count: Mapped[int] = _counter()
    file_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ExportItem(Base):
    """The ids a user picked for an export: a table, not a Redis payload, so 10^6 ids fit."""

    __tablename__ = "export_items"

    export_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("exports.id", ondelete="CASCADE"), primary_key=True
    )
    item_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)


class WaitlistEntry(Base):
    __tablename__ = "waitlist_entries"
    __table_args__ = (
        Index("uq_waitlist_lower_email", func.lower(text("email")), unique=True),
        # The hourly campaign cron scans only entries that still have a step due.
        Index(
            "ix_waitlist_next_email_at",
            "next_email_at",
            postgresql_where=text(
                "next_email_at IS NOT NULL AND unsubscribed_at IS NULL AND converted_at IS NULL"
            ),
        ),
        # The hourly tick deletes sign-ups left unconfirmed (jobs/email/campaign.py).
        Index(
            "ix_waitlist_unconfirmed",
            "created_at",
            postgresql_where=text("confirmed_at IS NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(Text)
    # How many campaign emails have been sent; the next one is step + 1.
    campaign_step: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    next_email_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the address owner confirmed the sign-up (WAITLIST_CONFIRM), or the sign-up itself
    # when no confirmation is asked. NULL: only the confirmation email may be sent.
    # Defaults to the insert's time: only `join_waitlist` under WAITLIST_CONFIRM leaves it NULL.
    confirmed_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    unsubscribed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    converted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created_at()


class EmailMessage(Base):
    """The outbox: one row per logical email, so no retry or duplicate delivery sends twice."""

    __tablename__ = "email_messages"
    __table_args__ = (
        CheckConstraint(_one_of("status", EMAIL_STATUSES), name="status_known"),
        # The reconciler scans rows not yet settled (worker/reconcile.py), oldest first.
        Index(
            "ix_email_messages_open",
            "created_at",
            postgresql_where=text("status IN ('pending', 'sending')"),
        ),
        # A reclaim locks every member of a batch (jobs/email/claims.py).
        Index("ix_email_messages_batch_id", "batch_id"),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    idempotency_key: Mapped[str] = mapped_column(Text, unique=True)
    to_email: Mapped[str] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    text_body: Mapped[str | None] = mapped_column("text", Text)
    # Extra header fields sent with the message ({"List-Unsubscribe": ...}); NULL for none.
    headers: Mapped[dict[str, str] | None] = mapped_column(JSONB(none_as_null=True))
    status: Mapped[EmailStatusName] = mapped_column(Text, server_default="pending")
    provider: Mapped[str | None] = mapped_column(Text)
    provider_message_id: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = _counter()
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The provider request this message was last claimed into: its members are resent
    # together, under `batch/<batch_id>`, after a timeout or a crash (jobs/email/claims.py).
    batch_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # The worker process (`host:pid`) whose send is in flight; NULL once it has ended.
    claimed_by: Mapped[str | None] = mapped_column(Text)


class EmailSuppression(Base):
    """An address we must not email (all email, or for `unsubscribe` campaign email only)."""

    __tablename__ = "email_suppressions"
    __table_args__ = (
        CheckConstraint(_one_of("reason", SUPPRESSION_REASONS), name="reason_known"),
        # The outbox claim looks addresses up by `lower(to_email)`: one spelling per address.
        CheckConstraint("email = lower(email)", name="email_lower_case"),
    )

    email: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    # Who or what added it: `resend:<svix-id>`, `sendgrid:<sg_event_id>`, `cli:<user>`.
    source: Mapped[str] = mapped_column(Text, server_default="")
    created_at: Mapped[datetime] = _created_at()


class EmailEvent(Base):
    """A signed provider webhook event, stored once (a replay hits the unique index)."""

    __tablename__ = "email_events"
    __table_args__ = (
        CheckConstraint(_one_of("provider", EMAIL_EVENT_PROVIDERS), name="provider_known"),
        Index("uq_email_events_provider_event", "provider", "event_id", unique=True),
    )

    id: Mapped[uuid.UUID] = _uuid_pk()
    provider: Mapped[str] = mapped_column(Text)
    # Resend: the `svix-id` header; SendGrid: the event's `sg_event_id`.
    event_id: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    received_at: Mapped[datetime] = _created_at()
    # Set in the transaction that applies the event (jobs/email/events.py).
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobCheckpoint(Base):
    """Where a long periodic job (the daily marketing sync) stopped, so a re-run resumes."""

    __tablename__ = "job_checkpoints"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    updated_at: Mapped[datetime] = _updated_at()

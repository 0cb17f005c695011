"""`JobsClient`: what an async web app calls to start background work and read its progress.

    async with JobsClient.from_settings(Settings()) as jobs:     # owns a Redis pool and engine
        status = await jobs.import_contacts(user_id, "contacts.csv")
    jobs = JobsClient(redis=arq_redis, sessions=async_sessionmaker)  # or borrows the app's

PostgreSQL holds the state users see (import and export rows, the outbox); Redis only carries
the job ids. Every row is committed before its job is enqueued, so a worker never looks for a
row that does not exist yet, and the reconciler can re-enqueue from PostgreSQL alone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal, Self

import aioboto3
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job
from pydantic import BaseModel
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportError, ContactImportJob, Export, User, WaitlistEntry
from db.session import create_engine, make_sessionmaker
from jobs.email import drafts
from jobs.email.caller_input import check_send_email, check_waitlist_signup
from jobs.email.campaign import STEP_DUE_AFTER_SIGNUP
from jobs.email.keys import caller_key, job_key, send_job, waitlist_kickoff_job_id
from jobs.email.outbox import Draft, store_pending
from worker.import_source import resolve_import_source
from worker.job_ids import export_job_id, import_job_id
from worker.serialization import deserialize, serialize
from worker.settings import Settings
from worker.storage import export_key, make_storage, s3_client_factory

IdLike = uuid.UUID | str


class ImportStatus(BaseModel):
    id: uuid.UUID
    status: str
    total_rows: int | None
    processed_rows: int
    error_count: int
    created_count: int
    updated_count: int
    percent: float
    message: str | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, row: ContactImportJob) -> Self:
        if row.status == "completed":
            percent = 100.0
        elif row.total_rows:
            percent = round(100.0 * row.processed_rows / row.total_rows, 1)
        else:
            percent = 0.0
        return cls(
            id=row.id,
            status=row.status,
            total_rows=row.total_rows,
            processed_rows=row.processed_rows,
            error_count=row.error_count,
            created_count=row.created_count,
            updated_count=row.updated_count,
            percent=percent,
            message=row.message,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class ImportRowError(BaseModel):
    row_number: int
    message: str
    payload: dict[str, Any]


class ExportStatus(BaseModel):
    id: uuid.UUID
    kind: Literal["contacts", "companies"]
    status: str
    row_count: int
    file_path: str | None
    error: str | None

    @classmethod
    def of(cls, row: Export) -> Self:
        return cls.model_validate(row, from_attributes=True)


class EnqueuedJob(BaseModel):
    """An arq job id; `None` when an identical job was already queued (arq deduplicates by id)."""

    job_id: str | None


class WaitlistSignup(BaseModel):
    id: uuid.UUID
    email: str
    created: bool


def _uuid(value: IdLike) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


class JobsClient:
    def __init__(
        self,
        *,
        redis: ArqRedis,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings | None = None,
    ) -> None:
        self.redis = redis
        self.sessions = sessions
        self.settings = settings if settings is not None else Settings()

    @classmethod
    @asynccontextmanager
    async def from_settings(cls, settings: Settings) -> AsyncIterator[JobsClient]:
        """A client that owns its Redis pool and database engine, closed on exit."""
        redis = await create_pool(
            RedisSettings.from_dsn(settings.redis_url),
            job_serializer=serialize,
            job_deserializer=deserialize,
        )
        engine = create_engine(settings, pool_size=5, pre_ping=True)
        try:
            yield cls(redis=redis, sessions=make_sessionmaker(engine), settings=settings)
        finally:
            await engine.dispose()
            await redis.aclose()

    async def _enqueue(
        self, function: str, queue: str, arq_job_id: str | None, **kwargs: Any
    ) -> str | None:
        job = await self.redis.enqueue_job(
            function, _queue_name=queue, _job_id=arq_job_id, **kwargs
        )
        return job.job_id if job is not None else None

    # -- imports ---------------------------------------------------------------------------

    async def import_contacts(self, user_id: IdLike, file_path: str) -> ImportStatus:
        """Validate the source, create the import row (`pending`) and enqueue it.

        `file_path` is a file inside `IMPORT_DIR` or `s3://S3_BUCKET/key`; anything else
        raises `ValueError` and creates nothing.
        """
        source = resolve_import_source(self.settings, file_path)
        async with self.sessions.begin() as session:
            row = ContactImportJob(user_id=_uuid(user_id), file_path=source)
            session.add(row)
            await session.flush()
            await session.refresh(row)
        await self._enqueue(
            "process_contacts_import", "imports", import_job_id(row.id), job_id=str(row.id)
        )
        return ImportStatus.of(row)

    async def import_status(self, job_id: IdLike) -> ImportStatus:
        async with self.sessions() as session:
            row = await session.get(ContactImportJob, _uuid(job_id))
        if row is None:
            raise LookupError(f"no import job {job_id}")
        return ImportStatus.of(row)

    async def import_errors(self, job_id: IdLike, limit: int = 100) -> list[ImportRowError]:
        query = (
            select(ContactImportError)
            .where(ContactImportError.job_id == _uuid(job_id))
            .order_by(ContactImportError.row_number)
            .limit(limit)
        )
        async with self.sessions() as session:
            rows = (await session.scalars(query)).all()
        return [
            ImportRowError(row_number=r.row_number, message=r.message, payload=r.payload)
            for r in rows
        ]

    async def cancel_import(self, job_id: IdLike) -> ImportStatus:
        """Stop an import: a pending one now, a running one at its next batch boundary."""
        key = _uuid(job_id)
        async with self.sessions.begin() as session:
            await session.execute(
                update(ContactImportJob)
                .where(ContactImportJob.id == key, ContactImportJob.status == "pending")
                .values(
                    status="cancelled",
                    finished_at=func.now(),
                    message="cancelled before it started",
                )
            )
            await session.execute(
                update(ContactImportJob)
                .where(
                    ContactImportJob.id == key,
                    ContactImportJob.status.in_(("pending", "processing")),
                )
                .values(cancel_requested=True)
            )
        return await self.import_status(key)

    # -- exports ---------------------------------------------------------------------------

    async def export_contacts(
        self, user_id: IdLike, contact_ids: Sequence[IdLike] | None = None
    ) -> ExportStatus:
        return await self._export("contacts", user_id, contact_ids)

    async def export_companies(
        self, user_id: IdLike, company_ids: Sequence[IdLike] | None = None
    ) -> ExportStatus:
        return await self._export("companies", user_id, company_ids)

    async def _export(
        self, kind: Literal["contacts", "companies"], user_id: IdLike, ids: Sequence[IdLike] | None
    ) -> ExportStatus:
        async with self.sessions.begin() as session:
            row = Export(user_id=_uuid(user_id), kind=kind, has_selection=ids is not None)
            session.add(row)
            await session.flush()
            await session.refresh(row)
            if ids:
                await _copy_export_items(session, row.id, ids)
        function = "generate_contact_export" if kind == "contacts" else "generate_company_export"
        await self._enqueue(function, "exports", export_job_id(row.id), export_id=str(row.id))
        return ExportStatus.of(row)

    async def export_status(self, export_id: IdLike) -> ExportStatus:
        async with self.sessions() as session:
            row = await session.get(Export, _uuid(export_id))
        if row is None:
            raise LookupError(f"no export {export_id}")
        return ExportStatus.of(row)

    async def export_url(self, export_id: IdLike, expires_s: int = 3600) -> str:
        """A presigned URL (s3) or a `file://` URL (local) for a completed export."""
        async with self.sessions() as session:
            row = await session.get(Export, _uuid(export_id))
        if row is None:
            raise LookupError(f"no export {export_id}")
        if row.status != "completed":
            raise LookupError(f"export {export_id} is {row.status}, not completed")
        storage = make_storage(self.settings, s3_client_factory(aioboto3.Session(), self.settings))
        return await storage.url(export_key(row.user_id, row.id), expires_s)

    # -- email and marketing ---------------------------------------------------------------

    async def send_email(
        self,
        to: str,
        subject: str,
        html: str,
        text: str | None = None,
        idempotency_key: str | None = None,
    ) -> EnqueuedJob:
        """Write the email to the outbox (`pending`) and enqueue it.

        Under an `idempotency_key` (kept apart from the platform's own keys, as `caller/<key>`)
        the first email wins and a repeat sends nothing; without one, every call is a new
        email. An invalid `to`, a subject over 998 characters or with a line break, an html
        or text part over 256 KiB, or a malformed key raises `ValueError`, writing nothing.
        """
        check_send_email(to, subject, html, text, idempotency_key)
        key = caller_key(idempotency_key) if idempotency_key else job_key(uuid.uuid4().hex)
        return await self._send(Draft(key, to, subject, html, text))

    async def send_welcome_email(self, user_id: IdLike) -> EnqueuedJob:
        """Write the user's welcome email to the outbox (once per user) and enqueue it.

        An unknown user raises `LookupError`: commit the user before calling this.
        """
        async with self.sessions() as session:
            user = await session.get(User, _uuid(user_id))
        if user is None:
            raise LookupError(f"no user {user_id}")
        # Off the loop: the first render of a process compiles the templates.
        draft = await asyncio.to_thread(drafts.welcome, user.id, user.email, user.name)
        return await self._send(draft)

    async def _send(self, draft: Draft) -> EnqueuedJob:
        # The row before the job, as for imports: if Redis loses the job (or the enqueue below
        # raises), the reconciler finds the `pending` row and enqueues it again.
        job = send_job(draft)
        assert job is not None  # the keys built above all map to a send job
        async with self.sessions.begin() as session:
            await store_pending(session, draft)
        return EnqueuedJob(
            job_id=await self._enqueue(job.function, "default", job.arq_job_id, **job.kwargs)
        )

    async def join_waitlist(self, email: str, name: str | None = None) -> WaitlistSignup:
        """Add the email to the waitlist (once: a second sign-up keeps the first) and greet it.

        The address must be valid as an import's would be; the name at most 100 characters,
        one line, with no web address or domain in it. Otherwise `ValueError`, nothing created.
        Step 1 is due from the commit on: if the enqueue after it fails (the error is raised),
        the hourly campaign cron sends it.
        """
        normalized, name = check_waitlist_signup(email, name)
        async with self.sessions.begin() as session:
            inserted = await session.scalar(
                pg_insert(WaitlistEntry)
                .values(
                    email=normalized,
                    name=name,
                    next_email_at=func.now() + STEP_DUE_AFTER_SIGNUP[1],
                )
                .on_conflict_do_nothing(index_elements=[func.lower(WaitlistEntry.email)])
                .returning(WaitlistEntry.id)
            )
            entry_id = inserted or await session.scalar(
                select(WaitlistEntry.id).where(func.lower(WaitlistEntry.email) == normalized)
            )
        assert entry_id is not None  # inserted now, or it conflicted with an existing row
        if inserted is not None:
            await self._enqueue(
                "kickoff_waitlist_first_email",
                "default",
                waitlist_kickoff_job_id(entry_id),
                entry_id=str(entry_id),
            )
        return WaitlistSignup(id=entry_id, email=normalized, created=inserted is not None)

    async def sync_contact(self, email: str) -> EnqueuedJob:
        return EnqueuedJob(job_id=await self._enqueue("sync_contact", "default", None, email=email))

    async def job_result(self, job_id: str, timeout_s: float | None = None) -> Any:
        """Wait for an arq job's result (raises the job's error, rebuilt as `RemoteJobError`)."""
        return await Job(job_id, self.redis, _deserializer=deserialize).result(timeout=timeout_s)


async def _copy_export_items(
    session: AsyncSession, export_id: uuid.UUID, ids: Sequence[IdLike]
) -> None:
    """COPY the selection into export_items: a million ids in seconds, not a million INSERTs."""
    connection = await (await session.connection()).get_raw_connection()
    asyncpg_connection = connection.driver_connection
    assert asyncpg_connection is not None
    await asyncpg_connection.copy_records_to_table(
        "export_items",
        records=((export_id, item_id) for item_id in {_uuid(i) for i in ids}),
        columns=("export_id", "item_id"),
    )

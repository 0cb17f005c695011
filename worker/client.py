"""`JobsClient`: what an async web app calls to start background work and read its progress.

    async with JobsClient.from_settings(Settings()) as jobs:     # owns a Redis pool and engine
        status = await jobs.import_contacts(user_id, "contacts.csv")  # IMPORT_DIR/<user_id>/
        status = await jobs.import_status(status.id, user_id=user_id)  # only user_id's rows
    jobs = JobsClient(redis=arq_redis, sessions=async_sessionmaker)  # or borrows the app's

A web app passes the signed-in user as `user_id=` to every read and cancel: another user's id
then raises the same `LookupError` as an unknown one. Without it (the operator CLI) any row is
answered.

PostgreSQL holds the state users see (import and export rows, the outbox); Redis only carries
the job ids. Every row is committed before its job is enqueued, so a worker never looks for a
row that does not exist yet, and the reconciler can re-enqueue from PostgreSQL alone.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import aioboto3
from arq.connections import ArqRedis
from arq.jobs import Job
from pydantic import BaseModel
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import (
    ContactImportError,
    ContactImportJob,
    Export,
    ExportKind,
    ExportStatusName,
    ImportStatusName,
    User,
    WaitlistEntry,
)
from db.session import create_engine, driver_connection, make_sessionmaker
from jobs.email import drafts
from jobs.email.caller_input import check_send_email, check_waitlist_signup
from jobs.email.campaign import STEP_DUE_AFTER_SIGNUP
from jobs.email.keys import caller_key, job_key, send_job
from jobs.email.outbox import Draft, store_pending
from jobs.email.suppression import suppress
from worker import tokens
from worker.import_source import resolve_import_source
from worker.redis_connect import arq_pool
from worker.routes import (
    EXPORT_ROUTES,
    KICKOFF_WAITLIST_FIRST_EMAIL,
    PROCESS_CONTACTS_IMPORT,
    SYNC_CONTACT,
    Route,
    enqueue,
    export_job_id,
    import_job_id,
    row_of_job_id,
    waitlist_kickoff_job_id,
)
from worker.serialization import deserialize, serialize
from worker.settings import Settings
from worker.storage import export_key, make_storage, s3_client_factory

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

IdLike = uuid.UUID | str
OwnedRow = TypeVar("OwnedRow", ContactImportJob, Export)
#: Ids per COPY chunk built in a thread: ~3.7 MB of COPY text each.
_COPY_CHUNK_IDS = 50_000


class ImportStatus(BaseModel):
    id: uuid.UUID
    status: ImportStatusName
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
    kind: ExportKind
    status: ExportStatusName
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


def _owned_by(model: type[OwnedRow], user_id: IdLike | None) -> list[ColumnElement[bool]]:
    """The owner condition for a WHERE clause: none without `user_id`."""
    return [] if user_id is None else [model.user_id == _uuid(user_id)]


class JobsClient:
    """Start imports, exports and emails, and read their progress.

    `export_url` opens one S3 client on first use and keeps it: a `from_settings` client
    closes it on exit; close a borrowing client with `await jobs.aclose()` or use it as
    `async with JobsClient(...) as jobs:` (the borrowed pool and sessions stay open).
    """

    def __init__(
        self,
        *,
        redis: ArqRedis,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings | None = None,
    ) -> None:
        """Borrow the app's arq pool and session factory.

        Raises `ValueError` for a pool without our JSON serializer: arq's default is pickle,
        which every worker refuses, so each job enqueued through it would be lost.
        """
        if redis.job_serializer is not serialize or redis.job_deserializer is not deserialize:
            raise ValueError(
                "the Redis pool must use worker.serialization's JSON format, not arq's default "
                "pickle (workers refuse it): create it with arq.create_pool(redis_settings, "
                "job_serializer=worker.serialization.serialize, "
                "job_deserializer=worker.serialization.deserialize)"
            )
        self.redis = redis
        self.sessions = sessions
        self.settings = settings if settings is not None else Settings()
        self._s3: S3Client | None = None
        self._s3_lock = asyncio.Lock()
        self._resources = AsyncExitStack()

    @classmethod
    @asynccontextmanager
    async def from_settings(cls, settings: Settings) -> AsyncIterator[JobsClient]:
        """A client that owns its Redis pool and database engine, closed on exit."""
        redis = await arq_pool(settings)
        engine = create_engine(
            settings.database, pool_size=5, pre_ping=True, pooler=settings.database_pooler
        )
        try:
            async with cls(redis=redis, sessions=make_sessionmaker(engine), settings=settings) as c:
                yield c
        finally:
            await engine.dispose()
            await redis.aclose()

    async def aclose(self) -> None:
        """Close what the client opened itself (the S3 client); borrowed resources stay open."""
        async with self._s3_lock:
            self._s3 = None
            resources, self._resources = self._resources, AsyncExitStack()
            await resources.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    @asynccontextmanager
    async def _s3_client(self) -> AsyncIterator[S3Client]:
        """The client's one S3 client (an `S3ClientFactory`): opened on first use, kept open.

        A new aioboto3 session and client per `export_url` cost 50-150 ms of model loading on
        the event loop each time (AUDIT-2026-12 L5); presigning with a kept client is local.
        """
        async with self._s3_lock:
            if self._s3 is None:
                factory = s3_client_factory(aioboto3.Session(), self.settings)
                self._s3 = await self._resources.enter_async_context(factory())
            client = self._s3
        yield client

    async def _owns_job(self, job_id: str, user_id: IdLike) -> bool:
        """Whether `job_id` is the arq job of an import or export row `user_id` owns."""
        named = row_of_job_id(job_id)
        if named is None:  # an email job, a cron, garbage: never a user's to read
            return False
        kind, row_id = named
        if kind == "import":
            return await self._owned_row(ContactImportJob, row_id, user_id) is not None
        return await self._owned_row(Export, row_id, user_id) is not None

    async def _owned_row(
        self, model: type[OwnedRow], row_id: IdLike, user_id: IdLike | None
    ) -> OwnedRow | None:
        """The row `row_id`, or None; with `user_id`, None too when another user owns it."""
        query = select(model).where(model.id == _uuid(row_id), *_owned_by(model, user_id))
        async with self.sessions() as session:
            row: OwnedRow | None = await session.scalar(query)
        return row

    async def _enqueue(self, route: Route, arq_job_id: str | None, **kwargs: Any) -> str | None:
        job = await enqueue(self.redis, route, arq_job_id, **kwargs)
        return job.job_id if job is not None else None

    # -- imports ---------------------------------------------------------------------------

    async def import_contacts(self, user_id: IdLike, file_path: str) -> ImportStatus:
        """Validate the source, create the import row (`pending`) and enqueue it.

        `file_path` is a file inside `IMPORT_DIR/<user_id>/` (a relative path is relative to
        it) or `s3://S3_BUCKET/uploads/<user_id>/...`; anything else, another user's file
        included, raises `ValueError` and creates nothing.
        """
        owner = _uuid(user_id)
        # resolve() and stat() are filesystem calls: keep them off the app's event loop.
        source = await asyncio.to_thread(resolve_import_source, self.settings, owner, file_path)
        async with self.sessions.begin() as session:
            row = ContactImportJob(user_id=owner, file_path=source)
            session.add(row)
            await session.flush()
            await session.refresh(row)
        await self._enqueue(PROCESS_CONTACTS_IMPORT, import_job_id(row.id), job_id=str(row.id))
        return ImportStatus.of(row)

    # Reads and cancels take `user_id=`: the owner is part of the SQL (WHERE user_id = :u), and
    # another user's row raises the very LookupError an unknown id does, so ids cannot be probed.

    async def import_status(self, job_id: IdLike, *, user_id: IdLike | None = None) -> ImportStatus:
        row = await self._owned_row(ContactImportJob, job_id, user_id)
        if row is None:
            raise LookupError(f"no import job {job_id}")
        return ImportStatus.of(row)

    async def import_errors(
        self, job_id: IdLike, limit: int = 100, *, user_id: IdLike | None = None
    ) -> list[ImportRowError]:
        """Rejected rows, first `limit` by row number (none for an unknown id without `user_id`)."""
        key = _uuid(job_id)
        query = (
            select(ContactImportError)
            .where(ContactImportError.job_id == key)
            .order_by(ContactImportError.row_number)
            .limit(limit)
        )
        async with self.sessions() as session:
            if user_id is not None:
                owned = select(ContactImportJob.id).where(
                    ContactImportJob.id == key, *_owned_by(ContactImportJob, user_id)
                )
                if await session.scalar(owned) is None:
                    raise LookupError(f"no import job {job_id}")
            rows = (await session.scalars(query)).all()
        return [
            ImportRowError(row_number=r.row_number, message=r.message, payload=r.payload)
            for r in rows
        ]

    async def cancel_import(self, job_id: IdLike, *, user_id: IdLike | None = None) -> ImportStatus:
        """Stop an import: a pending one now, a running one at its next batch boundary."""
        key = _uuid(job_id)
        owner = _owned_by(ContactImportJob, user_id)
        async with self.sessions.begin() as session:
            await session.execute(
                update(ContactImportJob)
                .where(ContactImportJob.id == key, ContactImportJob.status == "pending", *owner)
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
                    *owner,
                )
                .values(cancel_requested=True)
            )
        return await self.import_status(key, user_id=user_id)

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
        self, kind: ExportKind, user_id: IdLike, ids: Sequence[IdLike] | None
    ) -> ExportStatus:
        owner = _uuid(user_id)
        # Parsed before the row exists, so an invalid id creates nothing; in a thread, because
        # a million ids take seconds of CPU the web app's event loop must not wait for.
        selection = await asyncio.to_thread(_parse_selection, ids) if ids else []
        async with self.sessions.begin() as session:
            row = Export(user_id=owner, kind=kind, has_selection=ids is not None)
            session.add(row)
            await session.flush()
            await session.refresh(row)
            if selection:
                await _copy_export_items(session, row.id, selection)
        await self._enqueue(EXPORT_ROUTES[kind], export_job_id(row.id), export_id=str(row.id))
        return ExportStatus.of(row)

    async def export_status(
        self, export_id: IdLike, *, user_id: IdLike | None = None
    ) -> ExportStatus:
        row = await self._owned_row(Export, export_id, user_id)
        if row is None:
            raise LookupError(f"no export {export_id}")
        return ExportStatus.of(row)

    async def export_url(
        self, export_id: IdLike, expires_s: int = 3600, *, user_id: IdLike | None = None
    ) -> str:
        """A presigned URL (s3) or a `file://` URL (local) for a completed export."""
        row = await self._owned_row(Export, export_id, user_id)
        if row is None:
            raise LookupError(f"no export {export_id}")
        if row.status != "completed":
            raise LookupError(f"export {export_id} is {row.status}, not completed")
        storage = make_storage(self.settings, self._s3_client)
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
        draft = await asyncio.to_thread(
            drafts.welcome, user.id, user.email, user.name, self.settings.app_url
        )
        return await self._send(draft)

    async def _send(self, draft: Draft) -> EnqueuedJob:
        # The row before the job, as for imports: if Redis loses the job (or the enqueue below
        # raises), the reconciler finds the `pending` row and enqueues it again.
        job = send_job(draft)
        assert job is not None  # the keys built above all map to a send job
        async with self.sessions.begin() as session:
            await store_pending(session, draft)
        return EnqueuedJob(job_id=await self._enqueue(job.route, job.arq_job_id, **job.kwargs))

    async def join_waitlist(self, email: str, name: str | None = None) -> WaitlistSignup:
        """Add the email to the waitlist (once: a second sign-up keeps the first) and greet it.

        The address must be valid as an import's would be; the name at most 100 characters,
        one line, with no web address or domain in it. Otherwise `ValueError`, nothing created.
        The first email is due from the commit on: if the enqueue after it fails (the error is
        raised), the hourly campaign cron sends it. With WAITLIST_CONFIRM (the default) that
        email is a confirmation link and the campaign waits for `confirm_waitlist`.
        """
        normalized, name = check_waitlist_signup(email, name)
        async with self.sessions.begin() as session:
            inserted = await session.scalar(
                pg_insert(WaitlistEntry)
                .values(
                    email=normalized,
                    name=name,
                    next_email_at=func.now() + STEP_DUE_AFTER_SIGNUP[1],
                    confirmed_at=None if self.settings.waitlist_confirm else func.now(),
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
                KICKOFF_WAITLIST_FIRST_EMAIL,
                waitlist_kickoff_job_id(entry_id),
                entry_id=str(entry_id),
            )
        return WaitlistSignup(id=entry_id, email=normalized, created=inserted is not None)

    async def unsubscribe(self, token: str) -> bool:
        """Unsubscribe the waitlist entry an unsubscribe link's token names; False for a bad one.

        True also when it was unsubscribed before (or no longer exists): a one-click client
        may POST twice. Needs SECRET_KEY (`tokens.MissingSecretKey`, a ValueError, without it).
        """
        entry_id = tokens.read_token(tokens.UNSUBSCRIBE, token, self.settings.secret_key)
        if entry_id is None:
            return False
        async with self.sessions.begin() as session:
            email = await session.scalar(
                update(WaitlistEntry)
                .where(WaitlistEntry.id == entry_id, WaitlistEntry.unsubscribed_at.is_(None))
                .values(unsubscribed_at=func.now())
                .returning(WaitlistEntry.email)
            )
            if email is not None:
                # Campaign email to the address stops wherever it was queued (CONTRACT §13).
                await suppress(session, email, "unsubscribe", f"unsubscribe link of {entry_id}")
        return True

    async def confirm_waitlist(self, token: str) -> bool:
        """Confirm the sign-up a confirmation link's token names, and start its campaign.

        False for a bad token, or one whose entry expired unconfirmed (`drafts.CONFIRM_TTL`):
        the person signs up again. True also when it was confirmed before. Step 1 is due from
        the commit on (the hourly cron covers a lost kickoff). Needs SECRET_KEY.
        """
        entry_id = tokens.read_token(tokens.CONFIRM_WAITLIST, token, self.settings.secret_key)
        if entry_id is None:
            return False
        async with self.sessions.begin() as session:
            confirmed_now = await session.scalar(
                update(WaitlistEntry)
                .where(
                    WaitlistEntry.id == entry_id,
                    WaitlistEntry.confirmed_at.is_(None),
                    WaitlistEntry.created_at > func.now() - drafts.CONFIRM_TTL,
                )
                .values(confirmed_at=func.now(), next_email_at=func.now())
                .returning(WaitlistEntry.id)
            )
            if confirmed_now is None:
                confirmed_before = await session.scalar(
                    select(WaitlistEntry.id).where(
                        WaitlistEntry.id == entry_id, WaitlistEntry.confirmed_at.is_not(None)
                    )
                )
                return confirmed_before is not None
        # A fresh job id: the sign-up's kickoff (`waitlist:<id>`) may still hold its result.
        await self._enqueue(KICKOFF_WAITLIST_FIRST_EMAIL, None, entry_id=str(entry_id))
        return True

    async def sync_contact(self, email: str) -> EnqueuedJob:
        return EnqueuedJob(job_id=await self._enqueue(SYNC_CONTACT, None, email=email))

    async def job_result(
        self, job_id: str, timeout_s: float | None = None, *, user_id: IdLike | None = None
    ) -> Any:
        """Wait for an arq job's result (raises the job's error, rebuilt as `RemoteJobError`).

        With `user_id`, only the job of an import or export of that user is answered (its
        arq id, `worker.routes`); any other id raises `LookupError`.
        """
        if user_id is not None and not await self._owns_job(job_id, user_id):
            raise LookupError(f"no job {job_id}")
        return await Job(job_id, self.redis, _deserializer=deserialize).result(timeout=timeout_s)


def _parse_selection(ids: Iterable[IdLike]) -> list[uuid.UUID]:
    """The distinct ids of a selection; `ValueError` naming the first one that is not a UUID."""
    distinct: set[uuid.UUID] = set()
    for value in ids:
        try:
            distinct.add(_uuid(value))
        except ValueError:
            raise ValueError(f"not a UUID in the export selection: {str(value)[:64]!r}") from None
    return list(distinct)


async def _copy_export_items(
    session: AsyncSession, export_id: uuid.UUID, ids: Sequence[uuid.UUID]
) -> None:
    """COPY the selection into export_items: a million ids in seconds, not a million INSERTs.

    The COPY text is built in threads, a chunk at a time, so the caller's event loop only
    forwards bytes (asyncpg's own record encoding would run on it). UUIDs need no escaping.
    """

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(ids), _COPY_CHUNK_IDS):
            yield await asyncio.to_thread(
                _copy_text, export_id, ids[start : start + _COPY_CHUNK_IDS]
            )

    connection = await driver_connection(session)
    await connection.copy_to_table(
        "export_items", source=chunks(), columns=("export_id", "item_id"), format="text"
    )


def _copy_text(export_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> bytes:
    prefix = f"{export_id}\t"
    return "".join(f"{prefix}{item_id}\n" for item_id in ids).encode()

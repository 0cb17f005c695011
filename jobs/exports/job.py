"""`generate_contact_export` and `generate_company_export`: one COPY streamed into storage.

How an export stays correct when arq runs it more than once (at-least-once delivery):

- One writer at a time. The run holds a transaction-scoped advisory lock keyed on the export
  id (`pg_try_advisory_xact_lock`) on the connection that runs the COPY. A second delivery that
  finds it taken raises `ExportBusy`, a TransientError, and comes back after the retry backoff,
  by which time the holder has finished and the export reads `completed`. The lock dies with
  the holder's transaction or connection, so a crashed worker never leaves it behind. Being
  the transaction's, taken in the transaction that runs the COPY and writes `completed`, it
  holds behind PgBouncer in transaction pooling mode as well (a transaction keeps its server
  connection from BEGIN to COMMIT).
- Whole or nothing. The file is written through `storage.writer(export_key(user, export))`:
  the same key on every run, committed only when the COPY ends (an atomic rename, or
  `complete_multipart_upload`), aborted on any error or cancellation. A re-run overwrites the
  whole object; no reader ever sees a partial file.
- Done is done. `completed` is written only after the file is committed; a delivery that reads
  `completed` returns the stored summary and writes nothing.
- Failures. Transient ones (connection lost, S3 5xx) propagate and the job wrapper retries the
  export from the start; permanent ones, or the last transient one, reach `mark_failed`, which
  records the error unless another worker holds the lock (its outcome will decide) or the
  export has completed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypedDict

import asyncpg
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from db.models import Export, ExportKind, ExportStatusName
from db.session import driver_connection
from jobs.exports.errors import file_errors
from jobs.exports.progress import ProgressSink
from jobs.exports.query import export_query
from worker.context import Ctx
from worker.errors import PermanentError, TransientError
from worker.job import job
from worker.storage import export_key

log = logging.getLogger(__name__)

# hashtextextended: a 64-bit key from the export id, prefixed so that another job hashing its own
# id the same way gets other keys (imports take no advisory lock: jobs/imports/lease.py).
_TRY_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtextextended('export:' || :id, 0))")


class ExportResult(TypedDict):
    """What an export job returns: small and JSON-able (arq keeps it with the job)."""

    export_id: str
    kind: ExportKind
    status: ExportStatusName
    row_count: int
    file_path: str | None
    message: str | None
    # False when a re-run found the export completed and wrote nothing.
    written: bool


class ExportBusy(TransientError):
    """Another worker is writing this export right now; this delivery tries again later."""


async def run_export(ctx: Ctx, export_id: str, kind: ExportKind) -> ExportResult:
    """Write export `export_id` (of `kind`) to storage; returns the export's summary.

    While the lock's transaction is open, every statement of the run goes through its one
    connection, and the progress writes never hold the COPY back: an export never holds one
    database connection while it waits for another. Behind PgBouncer (transaction mode) the
    server connections are few and shared, and exports waiting for a second one while each
    holds a first would wait on each other until PgBouncer's `query_wait_timeout`.
    """
    eid = parse_export_id(export_id)
    sessions = ctx["sessions"]
    row = await _start(ctx, eid, kind)
    if row.status == "completed":
        log.info("export %s is already completed; nothing to do", eid)
        return summary(row, written=False)
    key = export_key(row.user_id, row.id)
    args: tuple[uuid.UUID, ...] = (row.user_id, row.id) if row.has_selection else (row.user_id,)
    async with export_lock(ctx["engine"], eid) as pg:
        # Under the lock: a run that finished between `_start` and here leaves it done.
        written = await pg.fetchval(_STATUS, eid) != "completed"
        if written:
            await _copy_and_complete(ctx, pg, row, key, args)
    async with sessions() as session:
        done = await session.scalar(select(Export).where(Export.id == eid))
    assert done is not None
    if written:
        log.info("export %s completed: %d rows to %s", eid, done.row_count, done.file_path)
    return summary(done, written=written)


async def _copy_and_complete(
    ctx: Ctx, pg: asyncpg.Connection, row: Export, key: str, args: tuple[uuid.UUID, ...]
) -> None:
    """The COPY into storage, then `completed`, on the lock's connection and transaction."""
    storage = ctx["storage"]
    progress = _Progress(ctx["sessions"], row.id)
    try:
        with file_errors(storage.location(key)):
            # Under the lock no other writer of this key is alive: what one left is abandoned.
            if discarded := await storage.discard_abandoned(key):
                log.warning(
                    "export %s: removed %d partial file(s) of killed runs", row.id, discarded
                )
            requested = (
                await pg.fetchval("SELECT count(*) FROM export_items WHERE export_id = $1", row.id)
                if row.has_selection
                else None
            )
            async with storage.writer(key) as out:
                status = await pg.copy_from_query(
                    export_query(row.kind, has_selection=row.has_selection),
                    *args,
                    output=ProgressSink(out, progress.report).write,
                    format="csv",
                    header=True,
                )
    finally:
        await progress.stop()
    row_count = copy_row_count(status)
    skipped = 0 if requested is None else requested - row_count
    # In the lock's transaction: nobody starts a re-run between the commit and this.
    await pg.execute(_COMPLETE, row.id, row_count, storage.location(key), skipped_message(skipped))


_STATUS = "SELECT status FROM exports WHERE id = $1"
_COMPLETE = (
    "UPDATE exports SET status = 'completed', row_count = $2, file_path = $3, error = NULL,"
    " message = $4, finished_at = now() WHERE id = $1"
)


class _Progress:
    """The running row count, written in the background: one write at a time, a report that
    comes while one is in flight is dropped (the next one carries a newer count)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], eid: uuid.UUID) -> None:
        self._sessions = sessions
        self._eid = eid
        self._writing: asyncio.Task[None] | None = None

    async def report(self, rows: int) -> None:
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write(rows))

    async def _write(self, rows: int) -> None:
        try:
            async with self._sessions.begin() as session:
                await session.execute(
                    update(Export)
                    .where(Export.id == self._eid, Export.status == "processing")
                    .values(row_count=rows)
                )
        except Exception as exc:
            # Only the live count is lost: the final one comes from COPY's own status.
            log.warning("export %s: progress not written (%s)", self._eid, exc)

    async def stop(self) -> None:
        """Drop a write still in flight (it may wait for a connection the run holds)."""
        if self._writing is not None:
            self._writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writing


async def _start(ctx: Ctx, eid: uuid.UUID, kind: ExportKind) -> Export:
    """The export row, switched to `processing` unless it is already `completed`.

    Raises `ExportBusy`, having written nothing, when a run holds the export's lock now (the
    lock is tried and let go with this short transaction; `export_lock` takes it for good).
    """
    async with ctx["sessions"].begin() as session:
        row = await session.scalar(select(Export).where(Export.id == eid))
        if row is None:
            raise PermanentError(f"export {eid} does not exist (deleted before it ran?)")
        if row.kind != kind:
            raise PermanentError(
                f"export {eid} is a {row.kind} export, but this job writes {kind} exports"
            )
        if row.status == "completed":
            return row
        if not await session.scalar(_TRY_LOCK, {"id": str(eid)}):
            raise ExportBusy(f"export {eid} is being written by another worker; will retry")
        started = await session.scalar(
            update(Export)
            .where(Export.id == eid)
            .values(
                status="processing",
                # The first start: with retries, finished_at - started_at is the whole wait.
                started_at=text("coalesce(started_at, now())"),
                row_count=0,
                error=None,
                message=None,
                finished_at=None,
            )
            .returning(Export)
            .execution_options(populate_existing=True)
        )
    assert started is not None
    return started


async def mark_failed(ctx: Ctx, kwargs: dict[str, Any], message: str) -> None:
    """`on_failure`: record `message` on the export, unless a live worker still owns it."""
    try:
        eid = parse_export_id(kwargs.get("export_id"))
    except PermanentError:
        return  # no row can be named by a bad id
    async with ctx["sessions"].begin() as session:
        if not await session.scalar(_TRY_LOCK, {"id": str(eid)}):
            log.info("export %s is being written by another worker; not marking it failed", eid)
            return
        await session.execute(
            update(Export)
            .where(Export.id == eid, Export.status != "completed")
            .values(status="failed", error=message, finished_at=text("now()"))
        )


def parse_export_id(value: object) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise PermanentError(f"export_id {value!r} is not a UUID") from None


def copy_row_count(status: str) -> int:
    """The row count of a `COPY n` command status."""
    verb, _, count = status.partition(" ")
    if verb != "COPY" or not count.isdigit():
        raise PermanentError(f"unexpected COPY status {status!r}")
    return int(count)


def skipped_message(skipped: int) -> str | None:
    if skipped <= 0:
        return None
    if skipped == 1:
        return "1 requested id was not found or belongs to another user and was skipped"
    return f"{skipped} requested ids were not found or belong to another user and were skipped"


def summary(row: Export, *, written: bool) -> ExportResult:
    """The job's result: small and JSON-able; `written` is False when a re-run did nothing."""
    return {
        "export_id": str(row.id),
        "kind": row.kind,
        "status": row.status,
        "row_count": row.row_count,
        "file_path": row.file_path,
        "message": row.message,
        "written": written,
    }


@contextlib.asynccontextmanager
async def export_lock(engine: AsyncEngine, eid: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
    """An asyncpg connection in a transaction that holds export `eid`'s advisory lock.

    Raises `ExportBusy` when another transaction holds it. The lock is released when the
    transaction ends, or when the connection dies with the worker.
    """
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            if not await conn.scalar(_TRY_LOCK, {"id": str(eid)}):
                raise ExportBusy(f"export {eid} is being written by another worker; will retry")
            yield await driver_connection(conn)
        except BaseException:
            # Keep the error that stopped the export: after a lost connection the rollback
            # fails too ("the underlying connection is closed") and would hide the cause.
            with contextlib.suppress(Exception):
                await transaction.rollback()
            raise
        await transaction.commit()


@job(on_failure=mark_failed)
async def generate_contact_export(ctx: Ctx, export_id: str) -> ExportResult:
    """Write the contacts export `export_id` (CONTRACT §9); a completed one is left as it is."""
    return await run_export(ctx, export_id, "contacts")


@job(on_failure=mark_failed)
async def generate_company_export(ctx: Ctx, export_id: str) -> ExportResult:
    """Write the companies export `export_id` (CONTRACT §9); a completed one is left as it is."""
    return await run_export(ctx, export_id, "companies")

"""The import's row in `contact_import_jobs`: ownership, checkpoints, and final states.

Exactly-once effect rests on two guards:

1. A session-level advisory lock keyed on the import id, held on a connection of its own for
   the whole run: a second runner (a duplicate delivery, a retry while the first still runs)
   does not get it and backs off.
2. Each batch's transaction locks the job row (`FOR UPDATE`) and checks that `processed_rows`
   is still what this runner resumed from. The rows, counters and checkpoint commit together,
   so even if the lock's connection were lost, no batch can be applied twice.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from jobs.imports.merge import BatchCounts, PreparedBatch, merge_batch
from worker.context import Ctx
from worker.errors import TransientError

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class ImportRunningElsewhere(TransientError):
    """Another runner owns this import; this delivery retries later (and usually finds it
    finished)."""

    def __init__(self) -> None:
        super().__init__("import is running elsewhere")


@dataclass(frozen=True)
class ImportRow:
    id: uuid.UUID
    user_id: uuid.UUID
    file_path: str
    status: str
    total_rows: int | None
    processed_rows: int
    error_count: int
    created_count: int
    updated_count: int
    cancel_requested: bool


def lock_key(import_id: uuid.UUID) -> int:
    """A signed 64-bit advisory-lock key from the import id."""
    return int.from_bytes(import_id.bytes[:8], "big", signed=True)


@asynccontextmanager
async def import_lock(engine: AsyncEngine, import_id: uuid.UUID) -> AsyncIterator[bool]:
    """Yield whether this process now owns the import; released (or closed) on exit."""
    async with engine.connect() as connection:
        key = lock_key(import_id)
        owned = bool(await connection.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}))
        # The lock is the session's, not the transaction's: end the transaction so this
        # connection does not sit "idle in transaction" for the whole import.
        await connection.commit()
        try:
            yield owned
        finally:
            if owned:
                try:
                    await connection.scalar(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await connection.commit()
                except Exception as exc:
                    # A dead connection has released the lock already; closing one does.
                    log.warning("advisory unlock of import %s failed (%s): closing", import_id, exc)
                    await connection.invalidate()
                except BaseException:
                    await connection.invalidate()
                    raise


_COLUMNS = (
    "id, user_id, file_path, status, total_rows, processed_rows, error_count, "
    "created_count, updated_count, cancel_requested"
)


async def load(
    sessions: async_sessionmaker[AsyncSession], import_id: uuid.UUID
) -> ImportRow | None:
    async with sessions() as session:
        row = (
            await session.execute(
                text(f"SELECT {_COLUMNS} FROM contact_import_jobs WHERE id = :id"),
                {"id": import_id},
            )
        ).one_or_none()
    return None if row is None else ImportRow(*row)


async def update(
    sessions: async_sessionmaker[AsyncSession], import_id: uuid.UUID, sql_set: str, **values: Any
) -> None:
    """`UPDATE contact_import_jobs SET <sql_set>` for this import while it is not final."""
    async with sessions.begin() as session:
        await session.execute(
            text(
                f"UPDATE contact_import_jobs SET {sql_set} WHERE id = :id "
                "AND status IN ('pending', 'processing')"
            ),
            {"id": import_id, **values},
        )


@dataclass(frozen=True)
class BatchOutcome:
    counts: BatchCounts | None  # None: the import was cancelled instead
    row: ImportRow  # the job row as this transaction left it


async def apply_batch(
    sessions: async_sessionmaker[AsyncSession],
    import_id: uuid.UUID,
    expected_processed_rows: int,
    batch: PreparedBatch,
    *,
    max_stored_errors: int,
    cancel_message: str,
) -> BatchOutcome:
    """One transaction: check ownership and cancellation, merge, advance the checkpoint."""
    async with sessions.begin() as session:
        # Through SQLAlchemy first: this opens the transaction the raw asyncpg calls join.
        found = (
            await session.execute(
                text(f"SELECT {_COLUMNS} FROM contact_import_jobs WHERE id = :id FOR UPDATE"),
                {"id": import_id},
            )
        ).one_or_none()
        if found is None:
            raise ImportRunningElsewhere()  # deleted under us: the next try finds it gone
        row = ImportRow(*found)
        if row.status != "processing" or row.processed_rows != expected_processed_rows:
            raise ImportRunningElsewhere()
        if row.cancel_requested:
            await _finish(session, import_id, "cancelled", cancel_message)
            return BatchOutcome(None, row)
        connection = await (await session.connection()).get_raw_connection()
        # Every batch stores its errors up to the cap in the transaction that counts them, so
        # the rows stored so far are exactly min(error_count, cap): the first `cap` bad rows.
        room = max(0, max_stored_errors - row.error_count)
        counts = await merge_batch(
            connection.driver_connection, row.user_id, import_id, batch, room
        )
        after = (
            await session.execute(
                text(
                    "UPDATE contact_import_jobs SET processed_rows = processed_rows + :rows, "
                    "created_count = created_count + :created, "
                    "updated_count = updated_count + :updated, "
                    "error_count = error_count + :errors "
                    f"WHERE id = :id RETURNING {_COLUMNS}"
                ),
                {
                    "id": import_id,
                    "rows": batch.data_rows,
                    "created": counts.created,
                    "updated": counts.updated,
                    "errors": counts.errors,
                },
            )
        ).one()
    return BatchOutcome(counts, ImportRow(*after))


async def finish(
    sessions: async_sessionmaker[AsyncSession],
    import_id: uuid.UUID,
    status: str,
    message: str | None,
) -> None:
    async with sessions.begin() as session:
        await _finish(session, import_id, status, message)


async def _finish(
    session: AsyncSession, import_id: uuid.UUID, status: str, message: str | None
) -> None:
    await session.execute(
        text(
            "UPDATE contact_import_jobs SET status = :status, message = :message, "
            "finished_at = now(), started_at = coalesce(started_at, now()) "
            "WHERE id = :id AND status IN ('pending', 'processing')"
        ),
        {"id": import_id, "status": status, "message": message},
    )


async def record_failure(ctx: Ctx, kwargs: dict[str, Any], message: str) -> None:
    """`on_failure` hook: mark the import failed, unless another runner owns it right now.

    A delivery that gave up because the import was "running elsewhere" must not fail the
    import the owner is still making progress on.
    """
    import_id = uuid.UUID(str(kwargs["job_id"]))
    async with import_lock(ctx["engine"], import_id) as owned:
        if not owned:
            log.warning("not marking import %s failed: another runner owns it", import_id)
            return
        await finish(ctx["sessions"], import_id, "failed", message)

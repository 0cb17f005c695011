"""The import's exactly-once commit protocol on its row in `contact_import_jobs`: ownership,
checkpoints, and final states.

Exactly-once effect rests on two guards:

1. A lease on the job row (`jobs.imports.lease`): a second runner (a duplicate delivery, a
   retry while the first still runs) does not get it and backs off, and every write below
   carries `lease_owner = <this run>` in its WHERE, so a run whose lease was taken over
   writes nothing more. It needs no session of its own, so it holds behind PgBouncer in
   transaction pooling mode too.
2. Each batch is merged as `PARTS` email-hash parts, each in a transaction of its own on its
   own connection, concurrently (one PostgreSQL backend per part). A part's transaction commits
   its contacts together with its counters and its bit in `batch_parts_done`, in an UPDATE of
   the job row whose WHERE re-checks `processed_rows` and that bit: a part is applied at most
   once whatever the lease does. The part that completes the batch advances
   `processed_rows` and clears `batch_rows`/`batch_parts_done`, so `processed_rows` is always
   the end of a fully committed batch, and a resumed run redoes only the missing parts of the
   batch recorded in `batch_rows`. The job row is locked only briefly: by the batch's companies
   transaction (which also checks the checkpoint and cancellation) and by each part's final
   UPDATE, so the parts' merges do not wait for each other.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ImportStatusName
from db.session import driver_connection
from jobs.imports.lease import LEASE_S, ImportRunningElsewhere, import_lease
from jobs.imports.merge import (
    ALL_PARTS,
    BatchCounts,
    PreparedBatch,
    PreparedPart,
    merge_part,
    upsert_companies,
)
from worker.context import Ctx

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class ImportRow:
    id: uuid.UUID
    user_id: uuid.UUID
    file_path: str
    status: ImportStatusName
    total_rows: int | None
    processed_rows: int
    error_count: int
    created_count: int
    updated_count: int
    cancel_requested: bool
    batch_rows: int | None  # data rows of the batch some of whose parts committed
    batch_parts_done: int  # bitmask of that batch's committed parts
    source_pin: str | None  # what the first read saw (`sources.py`), None before it
    source_encoding: str | None  # the encoding the first run chose for the whole file


# The job row's columns an `ImportRow` holds; rows are read back by name (`ImportRow(**row)`).
_COLUMNS = ", ".join(field.name for field in fields(ImportRow))


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
    return None if row is None else ImportRow(**row._mapping)


async def update(
    sessions: async_sessionmaker[AsyncSession],
    import_id: uuid.UUID,
    owner: str,
    sql_set: str,
    **values: Any,
) -> None:
    """`UPDATE contact_import_jobs SET <sql_set>` for this import while it is not final and
    `owner` holds its lease; raises `ImportRunningElsewhere` when the lease was taken over."""
    async with sessions.begin() as session:
        found = await session.scalar(
            text(
                f"UPDATE contact_import_jobs SET {sql_set} WHERE id = :id "
                "AND status IN ('pending', 'processing') AND lease_owner = :owner "
                "RETURNING id"
            ),
            {"id": import_id, "owner": owner, **values},
        )
    if found is None:
        raise ImportRunningElsewhere()  # the next try reads what the other run left


@dataclass(frozen=True)
class BatchOutcome:
    counts: BatchCounts | None  # None: the import was cancelled instead
    row: ImportRow  # the job row as this transaction left it


# Locks the row (as FOR UPDATE would) and renews the lease, only while `owner` holds it.
_RENEW_AND_READ = text(
    "UPDATE contact_import_jobs SET lease_expires_at = now() + make_interval(secs => :lease_s)"
    f" WHERE id = :id AND lease_owner = :owner RETURNING {_COLUMNS}"
)


async def apply_batch(
    sessions: async_sessionmaker[AsyncSession],
    import_id: uuid.UUID,
    owner: str,
    expected_processed_rows: int,
    batch: PreparedBatch,
    *,
    max_stored_errors: int,
    cancel_message: str,
) -> BatchOutcome:
    """Check the lease, the checkpoint and cancellation, upsert companies, then merge the
    parts at once."""
    async with sessions.begin() as session:
        # Through SQLAlchemy first: this opens the transaction the raw asyncpg calls join.
        found = (
            await session.execute(
                _RENEW_AND_READ, {"id": import_id, "owner": owner, "lease_s": LEASE_S}
            )
        ).one_or_none()
        if found is None:
            raise ImportRunningElsewhere()  # taken over, or deleted under us
        row = ImportRow(**found._mapping)
        if (
            row.status != "processing"
            or row.processed_rows != expected_processed_rows
            or row.batch_rows not in (None, batch.data_rows)
        ):
            raise ImportRunningElsewhere()
        # A batch some of whose parts committed is finished first: cancellation and the soft
        # limit act only at batch boundaries.
        if row.cancel_requested and not row.batch_parts_done:
            await _finish(session, import_id, owner, "cancelled", cancel_message)
            return BatchOutcome(None, row)
        # Its own short transaction (idempotent, redone with a resumed batch): the parts'
        # transactions see the companies committed.
        connection = await driver_connection(session)
        await upsert_companies(connection, row.user_id, batch.company_names)
    # Every batch stores its errors up to the cap in the transaction that counts them, so
    # the rows stored so far are exactly min(error_count, cap): the first `cap` bad rows.
    room = max(0, max_stored_errors - row.error_count)
    applied = await _all(
        [
            _apply_part(sessions, row, owner, index, part, batch.data_rows, room)
            for index, part in enumerate(batch.parts)
            if not row.batch_parts_done & (1 << index)
        ]
    )
    counts = BatchCounts(
        created=sum(c.created for c, _ in applied),
        updated=sum(c.updated for c, _ in applied),
        errors=sum(c.errors for c, _ in applied),
    )
    # The part whose UPDATE came last completed the batch and saw every part's counters.
    return BatchOutcome(counts, max((after for _, after in applied), key=_progress))


def _progress(row: ImportRow) -> tuple[int, int]:
    return row.processed_rows, -row.batch_parts_done


# $1 import id, $2 the part's bit, $3 ALL_PARTS, $4 the batch's data rows, $5 the checkpoint
# the batch starts at, $6-$8 the part's created, updated and error counts, $9 this run's lease
# token (the fence), $10 the lease's length in seconds (renewed with the part).
_COMMIT_PART = f"""
UPDATE contact_import_jobs SET
    lease_expires_at = now() + make_interval(secs => $10),
    processed_rows = processed_rows + CASE WHEN batch_parts_done | $2 = $3 THEN $4 ELSE 0 END,
    batch_rows = CASE WHEN batch_parts_done | $2 = $3 THEN NULL ELSE $4 END,
    batch_parts_done = CASE WHEN batch_parts_done | $2 = $3 THEN 0 ELSE batch_parts_done | $2 END,
    created_count = created_count + $6,
    updated_count = updated_count + $7,
    error_count = error_count + $8
WHERE id = $1 AND status = 'processing' AND processed_rows = $5 AND batch_parts_done & $2 = 0
    AND lease_owner = $9
RETURNING {_COLUMNS}
"""


async def _apply_part(
    sessions: async_sessionmaker[AsyncSession],
    row: ImportRow,
    owner: str,
    index: int,
    part: PreparedPart,
    data_rows: int,
    stored_errors_room: int,
) -> tuple[BatchCounts, ImportRow]:
    """One part's transaction: merge its contacts (part 0: store the batch's row errors),
    then add its counters and set its bit, advancing the checkpoint when it is the last.

    Plain asyncpg on a pooled connection: each round trip leaves the part's backend idle,
    and this makes 7 (BEGIN, staging table, COPY, the merge with the row errors, the job
    row's UPDATE, COMMIT). The job row is not read first: the UPDATE's WHERE is the check (a
    part some other runner already committed is merged again, then rolled back), and the
    parts never wait for each other's locks before it.
    """
    bit = 1 << index
    async with sessions() as session:
        pooled = await session.connection()
        connection = await driver_connection(pooled)
        try:
            async with connection.transaction():
                counts = await merge_part(connection, row.user_id, row.id, part, stored_errors_room)
                # Waits only for the other part's commit if it got here first; its WHERE then
                # sees the committed row (READ COMMITTED re-evaluates it).
                after = await connection.fetchrow(
                    _COMMIT_PART,
                    row.id,
                    bit,
                    ALL_PARTS,
                    data_rows,
                    row.processed_rows,
                    counts.created,
                    counts.updated,
                    counts.errors,
                    owner,
                    LEASE_S,
                )
                if after is None:
                    raise ImportRunningElsewhere()  # rolls this part back
        finally:
            if connection.is_in_transaction():
                # The rollback did not finish (cancelled again while rolling back, or the
                # connection broke): never give the pool a connection inside a transaction.
                await pooled.invalidate()
    return counts, ImportRow(**after)


async def _all(awaitables: list[Awaitable[_T]]) -> list[_T]:
    """Run at once; if one fails (or this task is cancelled), cancel and await the rest, so no
    part's transaction outlives the batch, then raise the first error as it is."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def finish(
    sessions: async_sessionmaker[AsyncSession],
    import_id: uuid.UUID,
    owner: str,
    status: ImportStatusName,
    message: str | None,
) -> None:
    async with sessions.begin() as session:
        await _finish(session, import_id, owner, status, message)


async def _finish(
    session: AsyncSession,
    import_id: uuid.UUID,
    owner: str,
    status: ImportStatusName,
    message: str | None,
) -> None:
    """The final state, written only by the lease's owner, which gives the lease up with it.

    Raises `ImportRunningElsewhere` when the lease was taken over (or the import ended) since
    the owner last checked: the row is the new owner's, so this run must not report an end.
    """
    finished = await session.scalar(
        text(
            "UPDATE contact_import_jobs SET status = :status, message = :message, "
            "finished_at = now(), started_at = coalesce(started_at, now()), "
            "lease_owner = NULL, lease_expires_at = NULL "
            "WHERE id = :id AND status IN ('pending', 'processing') AND lease_owner = :owner "
            "RETURNING id"
        ),
        {"id": import_id, "owner": owner, "status": status, "message": message},
    )
    if finished is None:
        raise ImportRunningElsewhere()


async def record_failure(ctx: Ctx, kwargs: dict[str, Any], message: str) -> None:
    """`on_failure` hook: mark the import failed, unless another runner owns it right now.

    A delivery that gave up because the import was "running elsewhere" must not fail the
    import the owner is still making progress on.
    """
    import_id = uuid.UUID(str(kwargs["job_id"]))
    try:
        async with import_lease(ctx["sessions"], import_id) as lease:
            await finish(ctx["sessions"], import_id, lease.owner, "failed", message)
    except ImportRunningElsewhere:
        log.warning("not marking import %s failed: another runner owns it", import_id)

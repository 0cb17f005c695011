"""`process_contacts_import(job_id)`: stream, validate and merge one CSV file in batches.

A producer task parses and validates batch N+1 (and collapses its duplicate emails), on a
thread of the import's own, while batch N's transaction runs, through a queue of at most
`QUEUED_BATCHES` prepared batches: the CPU-bound Python work overlaps the database work instead
of adding to it, and memory stays at a few batches whatever the file's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

from db.models import ENDED_IMPORT_STATUSES, ImportStatusName
from jobs.imports.checkpoint import (
    ImportRow,
    apply_batch,
    finish,
    load,
    record_failure,
    update,
)
from jobs.imports.headers import HeaderMap, list_names, map_header
from jobs.imports.lease import ImportLease, import_lease
from jobs.imports.merge import PreparedBatch, prepare
from jobs.imports.reader import CsvReader
from jobs.imports.record_parser import NumberedRow
from jobs.imports.sources import LocalFile, PinnedSource, S3Object
from jobs.imports.validate import ContactRow, RowError, Validator
from worker.context import Ctx
from worker.errors import InterruptedAfterProgress, PermanentError, TransientError
from worker.import_source import resolve_import_source, user_import_dir
from worker.job import job
from worker.retry import classify
from worker.routes import (
    CONTINUATION_POINTER_TTL_S,
    PROCESS_CONTACTS_IMPORT,
    enqueue,
    import_continuation_job_id,
    import_continuation_pointer,
)
from worker.storage import s3_client_factory

log = logging.getLogger(__name__)

QUEUED_BATCHES = 2  # one being merged, one or two ready: enough to keep PostgreSQL busy
VALIDATE_SLICE_ROWS = 1000  # the validator's own cache-friendly slice
# Parsing holds the GIL for a whole step (one C call): smaller steps let the loop thread
# answer database replies sooner. 64 KiB is ~500 rows, ~5 ms.
PARSE_STEP_BYTES = 64 << 10


AfterBatch = Callable[[ImportRow], Awaitable[None]]


class ImportResult(TypedDict):
    """What `process_contacts_import` returns: the row's counters after this run."""

    import_id: str
    # "processing" when this run handed the rest to a continuation job (see `note`).
    status: ImportStatusName
    processed: int
    created: int
    updated: int
    errors: int
    # Why nothing was done, or the continuation's job id.
    note: NotRequired[str]


@dataclass(frozen=True)
class _Ended:
    row: ImportRow | None  # the job row after the last commit of this run
    status: Literal["completed", "cancelled", "continued"]


@job(on_failure=record_failure)
async def process_contacts_import(ctx: Ctx, job_id: str) -> ImportResult:
    """Import the file of `contact_import_jobs` row `job_id` into the user's contacts.

    Safe to run twice: runners exclude each other with a lease on the job row, each resumes from
    the checkpoint committed with the last batch, and a finished import is left alone.
    """
    return await run_import(ctx, uuid.UUID(job_id))


async def run_import(
    ctx: Ctx, import_id: uuid.UUID, *, after_batch: AfterBatch | None = None
) -> ImportResult:
    """The job's body; `after_batch` (tests) runs after each committed batch."""
    # Parsing and validation run on one thread of the import's own, so the event loop only
    # waits on PostgreSQL and wakes for each reply within a GIL switch.
    cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"import-{import_id.hex[:8]}")
    try:
        return await _run_locked(ctx, import_id, cpu, after_batch)
    finally:
        cpu.shutdown(wait=False, cancel_futures=True)


async def _run_locked(
    ctx: Ctx, import_id: uuid.UUID, cpu: Executor, after_batch: AfterBatch | None
) -> ImportResult:
    sessions = ctx["sessions"]
    async with (
        import_lease(sessions, import_id) as lease,
        contextlib.AsyncExitStack() as opened,
    ):
        owner = lease.owner
        # Re-read under the lease: whatever an earlier runner committed is final.
        row = await load(sessions, import_id)
        if row is None:
            raise PermanentError(f"import {import_id} does not exist (deleted?)")
        if row.status in ENDED_IMPORT_STATUSES:
            return _summary(row, row.status, note=f"already {row.status}, nothing to do")
        if row.cancel_requested:
            await finish(sessions, import_id, owner, "cancelled", "cancelled before it started")
            return _summary(row, "cancelled")
        source = await _open_source(ctx, row, opened)
        # Parsing runs in a thread: the loop thread then wakes for each database reply within
        # one GIL switch interval (5 ms), not after a whole parse step (~20 ms). An import
        # makes ~10 round trips per batch, so this is most of the overlap's gain.
        reader = await CsvReader.open(
            source.source(),
            encoding=row.source_encoding,  # a resume reads as the first run decided
            step_bytes=PARSE_STEP_BYTES,
            parse_in_thread=True,
            executor=cpu,
        )
        if row.source_pin is None and source.pin is not None:
            # Before any batch commits: every later pass and run must read these bytes.
            await update(sessions, import_id, owner, "source_pin = :p", p=source.pin)
        header_map = map_header(reader.header)
        notes = _notes(header_map)
        if row.status == "pending":
            await update(
                sessions,
                import_id,
                owner,
                "status = 'processing', started_at = coalesce(started_at, now()), message = :m",
                m=notes,
            )
        total_rows = row.total_rows
        if total_rows is None:
            total_rows = await reader.count_rows()
            # The counting pass saw every byte, so its encoding holds for the whole file.
            await update(
                sessions,
                import_id,
                owner,
                "total_rows = :t, source_encoding = :e",
                t=total_rows,
                e=reader.encoding,
            )
        ended = await _run_batches(
            ctx, lease, row, reader, Validator(header_map), cpu, total_rows, notes, after_batch
        )
    last = ended.row or row
    if ended.status != "continued":
        return _summary(last, ended.status)
    # After the lease is released, so the continuation does not find it taken. A crash before
    # this line leaves this arq job unfinished: arq runs it again and it resumes the same way.
    continuation_id = import_continuation_job_id(import_id, last.processed_rows)
    await enqueue(ctx["redis"], PROCESS_CONTACTS_IMPORT, continuation_id, job_id=str(import_id))
    # The reconciler looks for the import under this id too, not just `import:<id>`.
    await ctx["redis"].set(
        import_continuation_pointer(import_id), continuation_id, ex=CONTINUATION_POINTER_TTL_S
    )
    log.info(
        "soft time limit reached at row %d; continues as %s", last.processed_rows, continuation_id
    )
    return _summary(last, "processing", note=f"continued as {continuation_id}")


async def _run_batches(
    ctx: Ctx,
    lease: ImportLease,
    row: ImportRow,
    reader: CsvReader,
    validator: Validator,
    cpu: Executor,
    total_rows: int,
    notes: str | None,
    after_batch: AfterBatch | None,
) -> _Ended:
    settings = ctx["settings"]
    queue: asyncio.Queue[PreparedBatch | Exception | None] = asyncio.Queue(QUEUED_BATCHES)
    producer = asyncio.create_task(
        _produce(
            reader,
            validator,
            cpu,
            row.processed_rows,
            settings.import_batch_rows,
            row.batch_rows,  # a batch some of whose parts committed is read again whole
            queue,
        )
    )
    loop = asyncio.get_running_loop()
    soft_deadline = ctx.get("soft_deadline")
    processed = row.processed_rows
    last: ImportRow | None = None
    try:
        while (batch := await queue.get()) is not None:
            if isinstance(batch, Exception):
                raise batch
            # At least one batch per run, so every continuation has a new checkpoint (and a
            # new arq job id: arq would drop a repeated one).
            if last is not None and soft_deadline is not None and loop.time() >= soft_deadline:
                return _Ended(last, "continued")
            cancel_message = _join(f"cancelled after {processed} of {total_rows} rows", notes)
            outcome = await apply_batch(
                ctx["sessions"],
                row.id,
                lease.owner,
                processed,
                batch,
                max_stored_errors=settings.import_max_stored_errors,
                cancel_message=cancel_message,
            )
            if outcome.counts is None:
                return _Ended(outcome.row, "cancelled")
            last = outcome.row
            processed = last.processed_rows
            if after_batch is not None:
                await after_batch(last)
    except Exception as exc:
        raise _with_progress(exc, row.processed_rows, processed) from exc
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
    await finish(ctx["sessions"], row.id, lease.owner, "completed", notes)
    return _Ended(last, "completed")


def _with_progress(exc: Exception, started_at_row: int, reached_row: int) -> Exception:
    """`exc`, or when this try committed rows before a transient failure, the error that says
    so: the retry then does not use up a try (worker.errors.InterruptedAfterProgress)."""
    failure = classify(exc)
    # A RateLimited (another run holds the lease) keeps its own wait.
    if reached_row == started_at_row or type(failure) is not TransientError:
        return exc
    return InterruptedAfterProgress(failure, progress=f"rows {started_at_row}-{reached_row}")


async def _produce(
    reader: CsvReader,
    validator: Validator,
    cpu: Executor,
    skip_rows: int,
    batch_rows: int,
    first_batch_rows: int | None,
    queue: asyncio.Queue[PreparedBatch | Exception | None],
) -> None:
    """Parse, validate and prepare batches ahead of the merge; errors travel in the queue."""
    try:
        async for numbered in reader.batches(
            max_rows=batch_rows, skip_rows=skip_rows, first_rows=first_batch_rows
        ):
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(cpu, _prepare, validator, numbered)
            await queue.put(prepared)
        await queue.put(None)
    except Exception as exc:
        await queue.put(exc)


def _prepare(validator: Validator, numbered: list[NumberedRow]) -> PreparedBatch:
    """Validate and collapse a batch (in the import's thread, see `run_import`)."""
    rows: list[ContactRow] = []
    errors: list[RowError] = []
    for start in range(0, len(numbered), VALIDATE_SLICE_ROWS):
        checked = validator.validate(numbered[start : start + VALIDATE_SLICE_ROWS])
        rows += checked.rows
        errors += checked.errors
    return prepare(rows, errors, len(numbered))


async def _open_source(ctx: Ctx, row: ImportRow, opened: contextlib.AsyncExitStack) -> PinnedSource:
    """Check the source against the row's owner again (a symlink may have been swapped since
    the client checked), then open it pinned to what the import's first read saw."""
    settings = ctx["settings"]
    try:
        resolved = await asyncio.to_thread(
            resolve_import_source, settings, row.user_id, row.file_path
        )
    except ValueError as exc:
        # The reason names server paths (IMPORT_DIR, where a symlink led): logs only.
        raise PermanentError(
            str(exc),
            public="the import file is no longer where it was uploaded (moved, replaced or "
            "deleted); upload it again and start a new import",
        ) from None
    if resolved.startswith("s3://"):
        bucket, _, key = resolved.removeprefix("s3://").partition("/")
        factory = s3_client_factory(ctx["s3_session"], settings)
        return S3Object(factory, bucket, key, expected_pin=row.source_pin)
    home = user_import_dir(settings, row.user_id)
    local = await asyncio.to_thread(
        LocalFile.open, home, Path(resolved).relative_to(home), row.source_pin
    )
    opened.callback(local.close)
    return local


def _notes(header_map: HeaderMap) -> str | None:
    notes = []
    if header_map.unknown_columns:
        notes.append(f"ignored columns: {list_names(header_map.unknown_columns)}")
    if header_map.duplicate_columns:
        notes.append(
            f"ignored repeated columns: {list_names(header_map.duplicate_columns)} "
            "(an earlier column has the same meaning)"
        )
    return "; ".join(notes) or None


def _join(*parts: str | None) -> str:
    return "; ".join(part for part in parts if part)


def _summary(row: ImportRow, status: ImportStatusName, note: str | None = None) -> ImportResult:
    summary: ImportResult = {
        "import_id": str(row.id),
        "status": status,
        "processed": row.processed_rows,
        "created": row.created_count,
        "updated": row.updated_count,
        "errors": row.error_count,
    }
    if note:
        summary["note"] = note
    return summary

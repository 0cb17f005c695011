"""Exports interrupted mid-write: a killed database connection retries from the start, a
cancelled try leaves no partial file or upload and the next delivery runs to the end."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.pool import QueuePool

from jobs.exports.job import generate_contact_export
from tests.conftest import RunBurst
from tests.exports.factories import (
    CONTACT_HEADER,
    assert_no_upload_left,
    export_row,
    files_under,
    job_tries,
    new_export,
    user_with_contacts,
)
from tests.support.ctx import CtxOpener, startup_with
from worker.client import JobsClient
from worker.settings import Settings
from worker.storage import LocalStorage, S3Storage, export_key
from worker.storage.local import LocalWriter

ROWS = 8_000  # ~1.1 MB of CSV: five 256 KiB parts
#: Enough CSV (~8 MB) that the COPY is still streaming when its backend is killed, rather
#: than already sitting whole in the loopback socket buffers.
KILL_ROWS = 60_000


async def test_database_connection_killed_mid_copy_retries_from_the_start(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user = await user_with_contacts(sessions, KILL_ROWS)
    killed: list[int] = []
    root = tmp_path / "exports"

    class KillOnFirstWrite(LocalStorage):
        @contextlib.asynccontextmanager
        async def writer(self, key: str) -> AsyncIterator[Any]:
            async with super().writer(key) as out:
                if not killed:
                    yield _Killer(out, killed, settings)
                else:
                    yield out

    status = await jobs_client.export_contacts(user)
    storage = KillOnFirstWrite(root, buffer_bytes=4096)
    await run_burst("exports", on_startup=startup_with(storage=storage))

    assert killed == [1]  # exactly one backend was running our COPY
    [retry] = [r.getMessage() for r in caplog.records if r.name == "worker.job"]
    assert re.fullmatch(
        r"transient failure, retry in [0-9.]+ s: database: ConnectionDoesNotExistError: "
        r"connection was closed in the middle of operation: "
        r"terminating connection due to administrator command",
        retry,
    )
    assert await job_tries(arq_redis, status.id) == (2, True)
    row = await export_row(sessions, status.id)
    assert (row.status, row.row_count, row.error) == ("completed", KILL_ROWS, None)
    assert files_under(root) == [f"{user}/{status.id}.csv"]
    data = (root / str(user) / f"{status.id}.csv").read_bytes()
    assert data.startswith(CONTACT_HEADER.encode()) and data.count(b"\n") == KILL_ROWS + 1


class _Killer:
    """A writer that terminates the backend running the COPY when the first chunk arrives."""

    def __init__(self, out: LocalWriter, killed: list[int], settings: Settings) -> None:
        self._out, self._killed, self._settings = out, killed, settings

    @property
    def bytes_written(self) -> int:
        return self._out.bytes_written

    async def write(self, chunk: bytes) -> None:
        await self._out.write(chunk)
        if not self._killed:
            admin = await asyncpg.connect(self._settings.database_url.replace("+asyncpg", ""))
            try:
                pids = await admin.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND query LIKE 'COPY (SELECT c.id::text%'"
                )
            finally:
                await admin.close()
            self._killed.append(len(pids))


class _Stall:
    """A writer that takes the first chunk, then blocks like a slow disk or network."""

    def __init__(self, out: Any, first_chunk: asyncio.Event) -> None:
        self._out, self._first_chunk = out, first_chunk

    @property
    def bytes_written(self) -> int:
        return int(self._out.bytes_written)

    async def write(self, chunk: bytes) -> None:
        await self._out.write(chunk)
        self._first_chunk.set()
        await asyncio.Event().wait()


def stalling(storage: Any, first_chunk: asyncio.Event) -> Any:
    """`storage` whose writers stall after their first chunk (cancel the job to end them)."""

    class Stalling:
        def location(self, key: str) -> str:
            return str(storage.location(key))

        async def discard_abandoned(self, key: str) -> int:
            return int(await storage.discard_abandoned(key))

        @contextlib.asynccontextmanager
        async def writer(self, key: str) -> AsyncIterator[Any]:
            async with storage.writer(key) as out:
                yield _Stall(out, first_chunk)

    return Stalling()


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_cancelled_export_leaves_no_partial_file_or_upload_and_reruns_cleanly(
    open_ctx: CtxOpener,
    sessions: async_sessionmaker[AsyncSession],
    s3_storage: S3Storage,
    s3: Any,
    s3_bucket: str,
    tmp_path: Path,
    backend: str,
) -> None:
    user = await user_with_contacts(sessions, ROWS)
    export_id = await new_export(sessions, user)
    root = tmp_path / "exports"
    # Small buffers: by the time the job stalls, a temporary file or a part already exists.
    real: Any = LocalStorage(root, buffer_bytes=1024) if backend == "local" else s3_storage
    first_chunk = asyncio.Event()
    ctx = await open_ctx("exports", storage=stalling(real, first_chunk))

    task = asyncio.create_task(generate_contact_export.run(ctx, export_id=str(export_id)))
    await asyncio.wait_for(first_chunk.wait(), 10)
    if backend == "local":
        [temporary] = files_under(root)
        assert temporary.startswith(f"{user}/.{export_id}.csv.") and temporary.endswith(".tmp")
    task.cancel()  # what a worker shutdown or arq's own timeout does
    with pytest.raises(asyncio.CancelledError):
        await task

    if backend == "local":
        assert files_under(root) == []
    else:
        assert_no_upload_left(s3, s3_bucket)
        assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    row = await export_row(sessions, export_id)
    assert (row.status, row.file_path) == ("processing", None)  # arq delivers it again
    # The lock died with the cancelled transaction: the next delivery runs to the end.
    ctx["storage"] = real
    result = await generate_contact_export.run(ctx, export_id=str(export_id))
    assert (result["status"], result["row_count"], result["written"]) == ("completed", ROWS, True)
    pool = ctx["engine"].pool
    assert isinstance(pool, QueuePool) and pool.checkedout() == 0


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_rerun_after_a_killed_writer_removes_what_it_left(
    open_ctx: CtxOpener,
    sessions: async_sessionmaker[AsyncSession],
    s3_storage: S3Storage,
    s3: Any,
    s3_bucket: str,
    tmp_path: Path,
    backend: str,
) -> None:
    """A SIGKILLed worker cannot abort its writer (found by `make chaos`): the next run must."""
    user = await user_with_contacts(sessions, ROWS)
    export_id = await new_export(sessions, user)
    other_id = await new_export(sessions, user)
    root = tmp_path / "exports"
    real: Any = LocalStorage(root) if backend == "local" else s3_storage
    # What a writer killed mid-way leaves, for this export and for another one of the user.
    abandoned = [export_key(user, export_id), export_key(user, other_id)]
    for key in abandoned:
        if backend == "local":
            (root / str(user)).mkdir(parents=True, exist_ok=True)
            (root / f"{user}/.{key.rpartition('/')[2]}.0123456789abcdef.tmp").write_bytes(b"id,")
        else:
            s3.create_multipart_upload(Bucket=s3_bucket, Key=s3_storage.object_key(key))
    ctx = await open_ctx("exports", storage=real)

    result = await generate_contact_export.run(ctx, export_id=str(export_id))

    assert (result["status"], result["row_count"]) == ("completed", ROWS)
    if backend == "local":
        # Only this export's leftover: the other export's run (or a live writer) owns its own.
        assert files_under(root) == sorted(
            [f"{user}/{export_id}.csv", f"{user}/.{other_id}.csv.0123456789abcdef.tmp"]
        )
    else:
        uploads = s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
        assert [u["Key"] for u in uploads] == [s3_storage.object_key(abandoned[1])]

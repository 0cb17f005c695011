"""Export runs as a worker sees them: S3 multipart, failures and retries, cancellation, the
one-writer lock, and end to end through `JobsClient` and a burst worker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job
from arq.worker import Retry
from botocore.exceptions import ClientError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from jobs.exports.job import ExportBusy, generate_contact_export, mark_failed
from tests.conftest import RunBurst
from tests.exports.conftest import TEST_PART_SIZE_BYTES
from tests.exports.factories import (
    CONTACT_HEADER,
    UPDATED_ISO,
    Rows,
    export_row,
    iso,
    make_ctx,
    new_export,
    same_rows,
)
from worker.client import JobsClient
from worker.context import Ctx
from worker.errors import PermanentError
from worker.lifecycle import startup
from worker.serialization import deserialize
from worker.settings import Settings
from worker.storage import LocalStorage, S3ClientFactory, S3Storage, Storage
from worker.storage.local import LocalWriter
from worker.storage.s3 import PUBLIC_STORAGE_ERROR

ROWS = 8_000  # ~1.1 MB of CSV: five 256 KiB parts
#: Enough CSV (~8 MB) that the COPY is still streaming when its backend is killed, rather
#: than already sitting whole in the loopback socket buffers.
KILL_ROWS = 60_000


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_no_upload_left(s3: Any, bucket: str) -> None:
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def with_storage(make: Callable[[Ctx], Storage]) -> Callable[[dict[str, Any]], Any]:
    """A worker startup that replaces the storage it builds with the test's own."""

    async def custom_startup(arq_ctx: dict[str, Any]) -> None:
        await startup(arq_ctx)
        arq_ctx["storage"] = make(arq_ctx)  # type: ignore[arg-type]

    return custom_startup


class FlakyParts:
    """An S3 client factory whose `upload_part` calls number `fail_on` fail with `code`."""

    def __init__(self, real: S3ClientFactory, fail_on: set[int], code: str, status: int):
        self.real, self.fail_on, self.code, self.status = real, fail_on, code, status
        self.calls = 0

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        async with self.real() as client:
            yield _FlakyClient(client, self)


class _FlakyClient:
    def __init__(self, client: Any, plan: FlakyParts) -> None:
        self._client, self._plan = client, plan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def upload_part(self, **kwargs: Any) -> Any:
        self._plan.calls += 1
        if self._plan.calls in self._plan.fail_on:
            error = {"Code": self._plan.code, "Message": "injected"}
            meta = {"HTTPStatusCode": self._plan.status}
            raise ClientError({"Error": error, "ResponseMetadata": meta}, "UploadPart")
        return await self._client.upload_part(**kwargs)


async def job_tries(arq_redis: ArqRedis, export_id: uuid.UUID) -> tuple[int, bool]:
    info = await Job(f"export:{export_id}", arq_redis, _deserializer=deserialize).result_info()
    assert info is not None
    return info.job_try, info.success


async def local_bytes(
    settings: Settings,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
    user: uuid.UUID,
    root: Path,
) -> bytes:
    """The same user's contacts exported to local storage, for byte-for-byte comparison."""
    storage = LocalStorage(root)
    export_id = await new_export(sessions, user)
    ctx = make_ctx(settings, engine, sessions, storage, arq_redis)
    await generate_contact_export.run(ctx, export_id=str(export_id))
    return (root / str(user) / f"{export_id}.csv").read_bytes()


async def test_s3_export_is_a_multipart_upload_identical_to_the_local_file(
    settings: Settings,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
    s3_storage: S3Storage,
    s3: Any,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.many_contacts(user, ROWS)
    export_id = await new_export(sessions, user)
    ctx = make_ctx(settings, engine, sessions, s3_storage, arq_redis)

    result = await generate_contact_export.run(ctx, export_id=str(export_id))

    expected = await local_bytes(settings, engine, sessions, arq_redis, user, tmp_path)
    key = f"exports/{user}/{export_id}.csv"
    obj = s3.get_object(Bucket=s3_bucket, Key=key)
    body = obj["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(expected).hexdigest()
    parts = math.ceil(len(body) / TEST_PART_SIZE_BYTES)
    assert parts >= 3
    assert obj["ETag"].endswith(f'-{parts}"')
    assert body.count(b"\n") == ROWS + 1
    assert (result["row_count"], result["file_path"]) == (ROWS, f"s3://{s3_bucket}/{key}")
    assert_no_upload_left(s3, s3_bucket)


async def test_transient_s3_failure_mid_upload_aborts_it_and_the_retry_completes(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    s3_factory: S3ClientFactory,
    s3_bucket: str,
    s3: Any,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.many_contacts(user, ROWS)
    flaky = FlakyParts(s3_factory, fail_on={3}, code="InternalError", status=500)

    def storage(ctx: Ctx) -> Storage:
        return S3Storage(flaky, s3_bucket, part_size_bytes=TEST_PART_SIZE_BYTES)

    status = await jobs_client.export_contacts(user)
    await run_burst("exports", on_startup=with_storage(storage))

    assert flaky.calls == 3 + 5  # 2 parts, the failed 3rd; then all 5 parts again
    assert await job_tries(arq_redis, status.id) == (2, True)
    assert_no_upload_left(s3, s3_bucket)  # the first try's upload was aborted
    row = await export_row(sessions, status.id)
    assert (row.status, row.row_count, row.error) == ("completed", ROWS, None)
    body = s3.get_object(Bucket=s3_bucket, Key=f"exports/{user}/{status.id}.csv")["Body"].read()
    assert body.startswith(CONTACT_HEADER.encode()) and body.count(b"\n") == ROWS + 1


async def test_permanent_s3_failure_mid_upload_fails_the_export_and_leaves_nothing(
    caplog: pytest.LogCaptureFixture,
    sessions: async_sessionmaker[AsyncSession],
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    s3_factory: S3ClientFactory,
    s3_bucket: str,
    s3: Any,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.many_contacts(user, ROWS)
    flaky = FlakyParts(s3_factory, fail_on={2}, code="AccessDenied", status=403)

    def storage(ctx: Ctx) -> Storage:
        return S3Storage(flaky, s3_bucket, part_size_bytes=TEST_PART_SIZE_BYTES)

    status = await jobs_client.export_contacts(user)
    await run_burst("exports", on_startup=with_storage(storage))

    assert await job_tries(arq_redis, status.id) == (1, False)
    row = await export_row(sessions, status.id)
    location = f"s3://{s3_bucket}/exports/{user}/{status.id}.csv"
    assert (row.status, row.row_count, row.file_path) == ("failed", 0, None)
    # The user reads plain words; the bucket, the key and the hint are for the operators' log.
    assert row.error == PUBLIC_STORAGE_ERROR
    assert (
        f"S3 upload_part for {location} failed: AccessDenied (injected): "
        "the credentials may not write this bucket or key"
    ) in caplog.text
    assert_no_upload_left(s3, s3_bucket)
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


async def test_database_connection_killed_mid_copy_retries_from_the_start(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.many_contacts(user, KILL_ROWS)
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
    await run_burst(
        "exports", on_startup=with_storage(lambda ctx: KillOnFirstWrite(root, buffer_bytes=4096))
    )

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

        @contextlib.asynccontextmanager
        async def writer(self, key: str) -> AsyncIterator[Any]:
            async with storage.writer(key) as out:
                yield _Stall(out, first_chunk)

    return Stalling()


@pytest.mark.parametrize("backend", ["local", "s3"])
async def test_cancelled_export_leaves_no_partial_file_or_upload_and_reruns_cleanly(
    settings: Settings,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
    s3_storage: S3Storage,
    s3: Any,
    s3_bucket: str,
    tmp_path: Path,
    backend: str,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.many_contacts(user, ROWS)
    export_id = await new_export(sessions, user)
    root = tmp_path / "exports"
    # Small buffers: by the time the job stalls, a temporary file or a part already exists.
    real: Any = LocalStorage(root, buffer_bytes=1024) if backend == "local" else s3_storage
    first_chunk = asyncio.Event()
    ctx = make_ctx(settings, engine, sessions, stalling(real, first_chunk), arq_redis)

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
    assert engine.pool.checkedout() == 0


async def test_second_runner_finds_the_lock_taken_and_retries_without_writing(
    settings: Settings,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
    tmp_path: Path,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.contact(user, "a@example.com")
    export_id = await new_export(sessions, user)
    storage = LocalStorage(tmp_path / "exports")
    ctx = make_ctx(settings, engine, sessions, storage, arq_redis)
    holder = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        # What a first runner holds for the length of its export.
        await holder.execute(
            "SELECT pg_advisory_lock(hashtextextended('export:' || $1::text, 0))", str(export_id)
        )
        with pytest.raises(Retry) as caught:
            await generate_contact_export.run(ctx, export_id=str(export_id))
        assert isinstance(caught.value.__cause__, ExportBusy)
        assert str(caught.value.__cause__) == (
            f"export {export_id} is being written by another worker; will retry"
        )
        # Out of retries, the wrapper gives up, but must not mark a running export failed.
        ctx["job_try"] = settings.max_retries + 1
        with pytest.raises(PermanentError, match="gave up after 4 tries"):
            await generate_contact_export.run(ctx, export_id=str(export_id))
        row = await export_row(sessions, export_id)
        assert (row.status, row.error, row.started_at) == ("pending", None, None)
        assert files_under(storage.root) == []
    finally:
        await holder.close()  # the lock goes with the session
    await mark_failed(ctx, {"export_id": str(export_id)}, "S3 is gone")
    row = await export_row(sessions, export_id)
    assert (row.status, row.error) == ("failed", "S3 is gone")


async def test_mark_failed_never_overwrites_a_completed_export(
    settings: Settings,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
    tmp_path: Path,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    export_id = await new_export(sessions, user)
    ctx = make_ctx(settings, engine, sessions, LocalStorage(tmp_path), arq_redis)
    await generate_contact_export.run(ctx, export_id=str(export_id))
    await mark_failed(ctx, {"export_id": str(export_id)}, "late failure of a duplicate")
    row = await export_row(sessions, export_id)
    assert (row.status, row.error) == ("completed", None)


async def test_end_to_end_through_the_client_and_a_burst_worker(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    other = await rows.user()
    a = await rows.contact(user, "a@example.com", first_name="=1+1", tags=["x", "y"])
    b = await rows.contact(user, "b@example.com", phone="+1 (555) 010-0000")
    foreign = await rows.contact(other, "c@other.test")
    companies = [await rows.company(user, name) for name in ("Acme", "Globex")]

    contacts = await jobs_client.export_contacts(user, [a, b, foreign])
    everything = await jobs_client.export_companies(user)
    worker = await run_burst("exports")

    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (2, 0, 0)
    status = await jobs_client.export_status(contacts.id)
    path = settings.export_dir.resolve() / str(user) / f"{contacts.id}.csv"
    assert status.model_dump() == {
        "id": contacts.id,
        "kind": "contacts",
        "status": "completed",
        "row_count": 2,
        "file_path": str(path),
        "error": None,
    }
    assert await jobs_client.export_url(contacts.id) == path.as_uri()
    assert same_rows(path.read_text()) == same_rows(
        CONTACT_HEADER
        + f"{a},a@example.com,'=1+1,,,,,,,,x;y,{iso(0)},{UPDATED_ISO}\n"
        + f"{b},b@example.com,,,+1 (555) 010-0000,,,,,,,{iso(1)},{UPDATED_ISO}\n"
    )
    row = await export_row(sessions, contacts.id)
    assert row.message == (
        "1 requested id was not found or belongs to another user and was skipped"
    )
    company_path = settings.export_dir.resolve() / str(user) / f"{everything.id}.csv"
    assert same_rows(company_path.read_text()) == same_rows(
        "id,name,domain,contacts_count,created_at,updated_at\n"
        + f"{companies[0]},Acme,,0,{iso(3)},{UPDATED_ISO}\n"
        + f"{companies[1]},Globex,,0,{iso(4)},{UPDATED_ISO}\n"
    )
    info = await Job(f"export:{contacts.id}", arq_redis, _deserializer=deserialize).result_info()
    assert info is not None and info.result == {
        "export_id": str(contacts.id),
        "kind": "contacts",
        "status": "completed",
        "row_count": 2,
        "file_path": str(path),
        "message": row.message,
        "written": True,
    }


async def test_end_to_end_to_s3_with_the_workers_own_storage(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    jobs_client: JobsClient,
    run_burst: RunBurst,
    s3_settings: Settings,
    s3: Any,
    s3_bucket: str,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    a = await rows.contact(user, "a@example.com", city="東京")
    worker_settings = settings.model_copy(
        update={
            name: getattr(s3_settings, name)
            for name in ("storage_backend", "s3_bucket", "s3_endpoint_url", "s3_region")
        }
    )
    client = JobsClient(redis=jobs_client.redis, sessions=sessions, settings=worker_settings)

    status = await client.export_contacts(user)
    await run_burst("exports", settings_=worker_settings)

    key = f"exports/{user}/{status.id}.csv"
    after = await client.export_status(status.id)
    assert (after.status, after.row_count, after.file_path) == (
        "completed",
        1,
        f"s3://{s3_bucket}/{key}",
    )
    expected = CONTACT_HEADER + f"{a},a@example.com,,,,,,東京,,,,{iso(0)},{UPDATED_ISO}\n"
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == expected.encode()
    url = await client.export_url(status.id, expires_s=120)
    await client.aclose()  # the S3 client export_url keeps open (the borrowed pool stays)
    assert url.startswith(f"{s3_settings.s3_endpoint_url}/{s3_bucket}/{key}?")
    assert "X-Amz-Expires=120" in url


async def test_a_missing_bucket_fails_the_export_in_plain_words_and_logs_the_detail(
    caplog: pytest.LogCaptureFixture,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    jobs_client: JobsClient,
    run_burst: RunBurst,
    s3_settings: Settings,
) -> None:
    """What a web app shows from `export_status` names no bucket, key or server detail."""
    rows = Rows(sessions)
    user = await rows.user()
    await rows.contact(user, "a@example.com")
    bucket = f"c360-gone-{uuid.uuid4().hex[:8]}"  # deleted, or a typo in S3_BUCKET
    worker_settings = settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": s3_settings.s3_endpoint_url,
            "s3_region": s3_settings.s3_region,
        }
    )
    client = JobsClient(redis=jobs_client.redis, sessions=sessions, settings=worker_settings)
    status = await client.export_contacts(user)
    await run_burst("exports", settings_=worker_settings)

    after = await client.export_status(status.id)
    assert after.status == "failed"
    assert after.error == PUBLIC_STORAGE_ERROR
    for secret in (bucket, "s3://", "NoSuchBucket", "S3_BUCKET", str(user)):
        assert secret not in (after.error or "")
    failure_lines = [r.getMessage() for r in caplog.records if "job failed" in r.getMessage()]
    assert any(f"s3://{bucket}/exports/{user}/{status.id}.csv" in line for line in failure_lines)
    assert any("NoSuchBucket" in line for line in failure_lines)

"""Exports to S3 as a worker runs them: one multipart upload, byte for byte the local file;
a failed part aborts the upload, then a retry completes or the export fails in plain words."""

from __future__ import annotations

import contextlib
import hashlib
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.exports.job import generate_contact_export
from tests.conftest import RunBurst
from tests.exports.factories import (
    CONTACT_HEADER,
    assert_no_upload_left,
    export_row,
    job_tries,
    new_export,
    user_with_contacts,
)
from tests.support.ctx import CtxOpener, startup_with
from tests.support.s3_server import TEST_PART_SIZE_BYTES, client_error
from worker.client import JobsClient
from worker.settings import Settings
from worker.storage import LocalStorage, S3ClientFactory, S3Storage
from worker.storage.s3 import PUBLIC_STORAGE_ERROR

ROWS = 8_000  # ~1.1 MB of CSV: five 256 KiB parts


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
            raise client_error(self._plan.code, self._plan.status, "injected")
        return await self._client.upload_part(**kwargs)


async def export_through(
    flaky: FlakyParts, bucket: str, jobs_client: JobsClient, run_burst: RunBurst, user: uuid.UUID
) -> uuid.UUID:
    """Export the user's contacts with a burst worker whose S3 storage uploads through `flaky`."""
    storage = S3Storage(flaky, bucket, part_size_bytes=TEST_PART_SIZE_BYTES)
    status = await jobs_client.export_contacts(user)
    await run_burst("exports", on_startup=startup_with(storage=storage))
    return status.id


async def local_bytes(
    open_ctx: CtxOpener, sessions: async_sessionmaker[AsyncSession], user: uuid.UUID, root: Path
) -> bytes:
    """The same user's contacts exported to local storage, for byte-for-byte comparison."""
    export_id = await new_export(sessions, user)
    ctx = await open_ctx("exports", storage=LocalStorage(root))
    await generate_contact_export.run(ctx, export_id=str(export_id))
    return (root / str(user) / f"{export_id}.csv").read_bytes()


async def test_s3_export_is_a_multipart_upload_identical_to_the_local_file(
    open_ctx: CtxOpener,
    sessions: async_sessionmaker[AsyncSession],
    s3_storage: S3Storage,
    s3: Any,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    user = await user_with_contacts(sessions, ROWS)
    export_id = await new_export(sessions, user)
    ctx = await open_ctx("exports", storage=s3_storage)

    result = await generate_contact_export.run(ctx, export_id=str(export_id))

    expected = await local_bytes(open_ctx, sessions, user, tmp_path)
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
    user = await user_with_contacts(sessions, ROWS)
    flaky = FlakyParts(s3_factory, fail_on={3}, code="InternalError", status=500)
    export_id = await export_through(flaky, s3_bucket, jobs_client, run_burst, user)

    assert flaky.calls == 3 + 5  # 2 parts, the failed 3rd; then all 5 parts again
    assert await job_tries(arq_redis, export_id) == (2, True)
    assert_no_upload_left(s3, s3_bucket)  # the first try's upload was aborted
    row = await export_row(sessions, export_id)
    assert (row.status, row.row_count, row.error) == ("completed", ROWS, None)
    body = s3.get_object(Bucket=s3_bucket, Key=f"exports/{user}/{export_id}.csv")["Body"].read()
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
    user = await user_with_contacts(sessions, ROWS)
    flaky = FlakyParts(s3_factory, fail_on={2}, code="AccessDenied", status=403)
    export_id = await export_through(flaky, s3_bucket, jobs_client, run_burst, user)

    assert await job_tries(arq_redis, export_id) == (1, False)
    row = await export_row(sessions, export_id)
    location = f"s3://{s3_bucket}/exports/{user}/{export_id}.csv"
    assert (row.status, row.row_count, row.file_path) == ("failed", 0, None)
    # The user reads plain words; the bucket, the key and the hint are for the operators' log.
    assert row.error == PUBLIC_STORAGE_ERROR
    assert (
        f"S3 upload_part for {location} failed: AccessDenied (injected): "
        "the credentials may not write this bucket or key"
    ) in caplog.text
    assert_no_upload_left(s3, s3_bucket)
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0

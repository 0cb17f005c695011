"""Exports end to end: `JobsClient` creates them, a burst worker runs them, to local disk
and to S3 with the worker's own storage."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.exports.factories import (
    CONTACT_HEADER,
    UPDATED_ISO,
    Rows,
    export_row,
    iso,
    same_rows,
)
from worker.client import JobsClient
from worker.serialization import deserialize
from worker.settings import Settings
from worker.storage.s3 import PUBLIC_STORAGE_ERROR


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
    # Both at once: with the default cap of 1 the second would wait its turn, which arq
    # counts as a retry (tests/fairness/).
    both = settings.model_copy(update={"export_max_running_per_user": 2})
    worker = await run_burst("exports", settings_=both)

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

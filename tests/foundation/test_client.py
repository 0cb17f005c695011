"""JobsClient: rows in PostgreSQL, jobs on the right queue, bad input refused before anything."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob, Export, ExportItem, WaitlistEntry
from worker.client import JobsClient
from worker.import_source import user_import_dir
from worker.serialization import deserialize
from worker.settings import Settings


async def _queued(
    redis_raw: aioredis.Redis, queue: str
) -> list[tuple[str, str, dict[str, object]]]:
    """(arq job id, function, kwargs) of every job waiting in `queue`."""
    found = []
    for job_id in await redis_raw.zrange(queue, 0, -1):
        payload = deserialize(await redis_raw.get(b"arq:job:" + job_id))
        found.append((job_id.decode(), payload["f"], payload["k"]))
    return found


async def _count(sessions: async_sessionmaker[AsyncSession], model: type) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_import_creates_a_pending_row_and_enqueues_on_imports(
    jobs_client: JobsClient, settings: Settings, user_id: uuid.UUID, redis_raw: aioredis.Redis
) -> None:
    home = user_import_dir(settings, user_id)
    home.mkdir(exist_ok=True)
    (home / "people.csv").write_text("email\na@b.co\n")
    status = await jobs_client.import_contacts(user_id, "people.csv")  # in IMPORT_DIR/<user_id>/
    assert (status.status, status.processed_rows, status.percent) == ("pending", 0, 0.0)
    assert await _queued(redis_raw, "imports") == [
        (f"import:{status.id}", "process_contacts_import", {"job_id": str(status.id)})
    ]
    again = await jobs_client.import_status(status.id)
    assert again.id == status.id and again.status == "pending"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "outside IMPORT_DIR/"),
        ("../escape.csv", "outside IMPORT_DIR/"),
        ("missing.csv", "no such file in IMPORT_DIR/"),
        ("link-out.csv", "outside IMPORT_DIR/"),
        ("s3://other-bucket/x.csv", "need S3_BUCKET"),
        ("https://example.com/x.csv", "files inside IMPORT_DIR/<user_id>/ or s3://"),
    ],
)
async def test_bad_import_paths_raise_and_create_nothing(
    jobs_client: JobsClient,
    settings: Settings,
    user_id: uuid.UUID,
    sessions: async_sessionmaker[AsyncSession],
    redis_raw: aioredis.Redis,
    tmp_path: Path,
    path: str,
    message: str,
) -> None:
    outside = tmp_path / "secret.csv"
    outside.write_text("email\n")
    home = user_import_dir(settings, user_id)
    home.mkdir(exist_ok=True)
    link = home / "link-out.csv"
    if not link.is_symlink():
        os.symlink(outside, link)
    with pytest.raises(ValueError, match=message):
        await jobs_client.import_contacts(user_id, path)
    assert await _count(sessions, ContactImportJob) == 0
    assert await redis_raw.zcard("imports") == 0


async def test_cancel_pending_import(
    jobs_client: JobsClient, settings: Settings, user_id: uuid.UUID
) -> None:
    home = user_import_dir(settings, user_id)
    home.mkdir(exist_ok=True)
    (home / "c.csv").write_text("email\n")
    status = await jobs_client.import_contacts(user_id, "c.csv")
    cancelled = await jobs_client.cancel_import(status.id)
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None


async def test_export_with_a_large_selection_stores_ids_in_postgres_not_redis(
    jobs_client: JobsClient,
    user_id: uuid.UUID,
    sessions: async_sessionmaker[AsyncSession],
    redis_raw: aioredis.Redis,
) -> None:
    ids = [uuid.uuid4() for _ in range(5000)]
    status = await jobs_client.export_contacts(user_id, ids + ids[:10])  # duplicates collapse
    assert (status.kind, status.status, status.row_count) == ("contacts", "pending", 0)
    assert await _count(sessions, ExportItem) == 5000
    queued = await _queued(redis_raw, "exports")
    assert queued == [
        (f"export:{status.id}", "generate_contact_export", {"export_id": str(status.id)})
    ]
    assert len(await redis_raw.get(f"arq:job:export:{status.id}")) < 300


async def test_export_all_companies_has_no_selection(
    jobs_client: JobsClient, user_id: uuid.UUID, sessions: async_sessionmaker[AsyncSession]
) -> None:
    status = await jobs_client.export_companies(user_id)
    async with sessions() as session:
        row = await session.get(Export, status.id)
    assert row is not None and (row.kind, row.has_selection) == ("companies", False)
    assert await jobs_client.export_status(status.id) == status


async def test_join_waitlist_twice_keeps_one_entry_and_one_job(
    jobs_client: JobsClient, sessions: async_sessionmaker[AsyncSession], redis_raw: aioredis.Redis
) -> None:
    first = await jobs_client.join_waitlist(" Ada@Example.com ", "Ada")
    second = await jobs_client.join_waitlist("ada@example.com")
    assert (first.created, second.created) == (True, False)
    assert first.id == second.id and first.email == "ada@example.com"
    assert await _count(sessions, WaitlistEntry) == 1
    assert await _queued(redis_raw, "default") == [
        (f"waitlist:{first.id}", "kickoff_waitlist_first_email", {"entry_id": str(first.id)})
    ]


async def test_send_email_with_the_same_key_is_queued_once(
    jobs_client: JobsClient, redis_raw: aioredis.Redis
) -> None:
    first = await jobs_client.send_email("a@b.co", "Hi", "<p>Hi</p>", idempotency_key="k-1")
    second = await jobs_client.send_email("a@b.co", "Hi", "<p>Hi</p>", idempotency_key="k-1")
    assert (first.job_id, second.job_id) == ("email:k-1", None)
    queued = await _queued(redis_raw, "default")
    assert queued == [
        (
            "email:k-1",
            "send_email",
            {
                "to": "a@b.co",
                "subject": "Hi",
                "html": "<p>Hi</p>",
                "text": None,
                "idempotency_key": "k-1",
            },
        )
    ]


async def test_from_settings_owns_and_closes_its_connections(
    settings: Settings, user_id: uuid.UUID
) -> None:
    async with JobsClient.from_settings(settings) as jobs:
        queued = await jobs.sync_contact("a@b.co")
        welcome = await jobs.send_welcome_email(user_id)
    assert queued.job_id is not None
    assert welcome.job_id == f"welcome:{user_id}"


async def test_export_url_for_a_completed_local_export(
    jobs_client: JobsClient,
    user_id: uuid.UUID,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
) -> None:
    status = await jobs_client.export_contacts(user_id)
    with pytest.raises(LookupError, match="is pending, not completed"):
        await jobs_client.export_url(status.id)
    async with sessions.begin() as session:
        row = await session.get(Export, status.id)
        assert row is not None
        row.status = "completed"
    url = await jobs_client.export_url(status.id)
    expected = (settings.export_dir / str(user_id) / f"{status.id}.csv").resolve()
    assert url == expected.as_uri()

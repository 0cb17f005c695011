"""What a web app's JobsClient holds: a JSON pool only (M9), one S3 client (L5), large selections.

The S3 tests run against moto's S3 server on a loopback port; the pool test against a real
`arq.create_pool(...)` made with arq's defaults, as a web app following arq's docs would.
"""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import aioboto3
import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import Contact, Export, ExportItem
from tests.conftest import RunBurst
from worker.client import JobsClient
from worker.serialization import serialize
from worker.settings import Settings

# -- M9: a borrowed pool must speak our JSON ---------------------------------------------------


async def test_a_borrowed_pool_made_with_arqs_defaults_is_refused_with_how_to_make_one(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    pickle_pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    half_pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url), job_serializer=serialize
    )
    try:
        for pool in (pickle_pool, half_pool):
            with pytest.raises(ValueError) as refused:
                JobsClient(redis=pool, sessions=sessions, settings=settings)
            message = str(refused.value)
            assert "not arq's default pickle" in message
            assert "job_serializer=worker.serialization.serialize" in message
            assert "job_deserializer=worker.serialization.deserialize" in message
    finally:
        await pickle_pool.aclose()
        await half_pool.aclose()


# -- L5: one S3 client for the client's life ---------------------------------------------------


class ClientCount:
    """How many S3 clients aioboto3 opened and closed (the real clients, only counted)."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0


@pytest.fixture
def s3_clients(monkeypatch: pytest.MonkeyPatch) -> ClientCount:
    count = ClientCount()
    real_client = aioboto3.Session.client

    class Counted:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __aenter__(self) -> Any:
            client = await self.inner.__aenter__()
            count.opened += 1
            return client

        async def __aexit__(self, *exc_info: Any) -> Any:
            count.closed += 1
            return await self.inner.__aexit__(*exc_info)

    def client(self: aioboto3.Session, *args: Any, **kwargs: Any) -> Counted:
        return Counted(real_client(self, *args, **kwargs))

    monkeypatch.setattr(aioboto3.Session, "client", client)
    return count


@pytest.fixture
async def completed_export(
    sessions: async_sessionmaker[AsyncSession], user_id: uuid.UUID
) -> AsyncIterator[uuid.UUID]:
    async with sessions.begin() as session:
        export_id = await session.scalar(
            insert(Export)
            .values(user_id=user_id, kind="contacts", status="completed")
            .returning(Export.id)
        )
    assert export_id is not None
    yield export_id


async def test_export_urls_share_one_s3_client_closed_when_from_settings_exits(
    s3_settings: Settings, s3_clients: ClientCount, completed_export: uuid.UUID, user_id: uuid.UUID
) -> None:
    key = f"{s3_settings.s3_bucket}/exports/{user_id}/{completed_export}.csv?"
    async with JobsClient.from_settings(s3_settings) as jobs:
        first = await jobs.export_url(completed_export)
        second, *more = await asyncio.gather(
            *(jobs.export_url(completed_export, expires_s=60) for _ in range(5))
        )
        assert (s3_clients.opened, s3_clients.closed) == (1, 0)
    assert (s3_clients.opened, s3_clients.closed) == (1, 1)
    for url in (first, second, *more):
        assert url.startswith(f"{s3_settings.s3_endpoint_url}/{key}")
    assert "X-Amz-Expires=60" in second


async def test_a_borrowing_client_closes_its_s3_client_and_leaves_the_pool_open(
    s3_settings: Settings,
    s3_clients: ClientCount,
    completed_export: uuid.UUID,
    arq_redis: ArqRedis,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with JobsClient(redis=arq_redis, sessions=sessions, settings=s3_settings) as jobs:
        await jobs.export_url(completed_export)
        await jobs.export_url(completed_export)
        assert (s3_clients.opened, s3_clients.closed) == (1, 0)
    assert (s3_clients.opened, s3_clients.closed) == (1, 1)
    assert await arq_redis.ping()  # the app's own pool is still its own, and open

    # aclose() works the same way, and a later call opens a fresh client.
    jobs = JobsClient(redis=arq_redis, sessions=sessions, settings=s3_settings)
    await jobs.export_url(completed_export)
    await jobs.aclose()
    await jobs.export_url(completed_export)
    await jobs.aclose()
    assert (s3_clients.opened, s3_clients.closed) == (3, 3)


# -- L5: a large selection, parsed off the caller's event loop -------------------------------


class WatchedIds(Sequence[Any]):
    """A web app's selection that notes which threads walked through it."""

    def __init__(self, ids: list[Any]) -> None:
        self.ids = ids
        self.threads: set[int] = set()

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        self.threads.add(threading.get_ident())
        return self.ids[index]

    def __iter__(self) -> Iterator[Any]:
        self.threads.add(threading.get_ident())
        return iter(self.ids)


async def _count(sessions: async_sessionmaker[AsyncSession], model: type) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_a_200k_id_selection_is_parsed_off_the_loop_and_exports_exactly_the_picked_rows(
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    settings: Settings,
    run_burst: RunBurst,
) -> None:
    async with sessions.begin() as session:
        picked = list(
            await session.scalars(
                insert(Contact)
                .values([{"user_id": user_id, "email": f"p{i}@example.com"} for i in range(3)])
                .returning(Contact.id)
            )
        )
        await session.execute(insert(Contact).values(user_id=user_id, email="left@example.com"))
    unknown = [uuid.uuid4() for _ in range(200_000 - len(picked))]
    # The forms a web app sends: UUIDs, strings, upper case, and the same id twice.
    selection = WatchedIds(
        [*unknown, str(picked[0]), str(picked[1]).upper(), picked[2], str(unknown[0]), picked[2]]
    )

    status = await jobs_client.export_contacts(user_id, selection)

    assert threading.get_ident() not in selection.threads
    assert await _count(sessions, ExportItem) == 200_000
    async with sessions() as session:
        stored = set(
            await session.scalars(
                select(ExportItem.item_id).where(ExportItem.export_id == status.id)
            )
        )
    assert stored == {*unknown, *picked}

    await run_burst("exports")
    done = await jobs_client.export_status(status.id, user_id=user_id)
    assert (done.status, done.row_count) == ("completed", 3)
    assert done.file_path is not None
    text = await asyncio.to_thread(Path(done.file_path).read_text)
    exported = csv.DictReader(io.StringIO(text, newline=""))
    emails = sorted(row["email"] for row in exported)
    assert emails == ["p0@example.com", "p1@example.com", "p2@example.com"]


async def test_an_invalid_id_in_a_selection_is_refused_before_anything_is_created(
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    redis_raw: aioredis.Redis,
) -> None:
    selection = [str(uuid.uuid4()) for _ in range(1000)] + ["42; DROP TABLE contacts"]
    with pytest.raises(ValueError, match="not a UUID in the export selection: '42; DROP TABLE"):
        await jobs_client.export_contacts(user_id, selection)
    assert await _count(sessions, Export) == 0
    assert await _count(sessions, ExportItem) == 0
    assert await redis_raw.zcard("exports") == 0

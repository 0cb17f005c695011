"""The test rig: real PostgreSQL and Redis, a fresh database per session, clean state per test.

- PostgreSQL: a database of the session's own (`c360_test_<random>`), migrated once by Alembic,
  tables truncated before each test, dropped at the end.
- Redis: a database number of the tests' own (TEST_REDIS_DB, default 15; under pytest-xdist
  worker gwN takes TEST_REDIS_DB - N). The rig refuses to flush a database that holds keys it
  did not write, so it never eats someone else's data.
- `run_burst`: a real arq worker in burst mode (`poll_delay=0`) on this event loop.
- `open_ctx`: a job's ctx built by the real `lifecycle.startup`, with the test's own resources
  swapped in where it needs them (tests/support/ctx.py); shut down after the test.
- S3: one moto server for the session (tests/support/s3_server.py), a fresh bucket per test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from db.migrate import upgrade
from db.models import Base
from db.session import create_engine, make_sessionmaker
from tests.support.ctx import CtxOpener
from tests.support.users import new_user
from worker.client import JobsClient
from worker.job import AnyJob, CronSchedule
from worker.main import worker_settings
from worker.routes import QueueName
from worker.serialization import deserialize, serialize
from worker.settings import Settings

if TYPE_CHECKING:
    from tests.support.s3_server import S3TestServer

PG_SERVER = os.environ.get("TEST_PG_SERVER", "postgresql+asyncpg://postgres@127.0.0.1:5432")
# Under pytest-xdist (`-n 2`) each worker process takes the database below the previous one's.
_XDIST_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "15")) - _XDIST_INDEX
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
REDIS_OWNER_KEY = "c360:test-rig-owns-this-db"

RunBurst = Callable[..., Awaitable[Worker]]


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_SERVER.replace("+asyncpg", "") + "/postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def test_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("c360")


@pytest.fixture(scope="session")
async def settings(test_root: Path) -> AsyncIterator[Settings]:
    database = f"c360_test_{uuid.uuid4().hex[:10]}"
    built = Settings(
        database_url=f"{PG_SERVER}/{database}",
        redis_url=REDIS_URL,
        import_dir=test_root / "imports",
        export_dir=test_root / "exports",
        retry_base_delay_s=0.01,
        job_timeout_s=60,
        job_soft_timeout_s=50,
        import_batch_rows=1000,
        # EMAIL_PROVIDER has no default; the default worker refuses to start without one.
        email_provider="console",
    )
    built.import_dir.mkdir(parents=True)
    built.export_dir.mkdir(parents=True)
    await upgrade(built.database)
    yield built
    await _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database, pooler=settings.database_pooler)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)


@pytest.fixture(scope="session")
async def redis_raw(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    keys = await client.dbsize()
    if keys and not await client.exists(REDIS_OWNER_KEY):
        pytest.exit(
            f"Redis {settings.redis_url} holds {keys} keys the tests did not write; "
            "set TEST_REDIS_DB to a free database number",
            returncode=3,
        )
    yield client
    await client.aclose()


@pytest.fixture(autouse=True)
async def clean_state(engine: AsyncEngine, redis_raw: aioredis.Redis) -> None:
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    async with engine.begin() as connection:
        await connection.execute(text(f"TRUNCATE {tables} CASCADE"))
    await redis_raw.flushdb()
    await redis_raw.set(REDIS_OWNER_KEY, "1")


@pytest.fixture
async def arq_redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url),
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    yield pool
    await pool.aclose()


@pytest.fixture
def jobs_client(
    arq_redis: ArqRedis, sessions: async_sessionmaker[AsyncSession], settings: Settings
) -> JobsClient:
    return JobsClient(redis=arq_redis, sessions=sessions, settings=settings)


@pytest.fixture
async def run_burst(settings: Settings) -> AsyncIterator[RunBurst]:
    """`await run_burst("imports")` runs that queue until it is empty; returns the worker.

    No cron jobs unless `crons=` names them: a burst that crossed a minute boundary would
    also run the minutely reconciler (a flaky extra job in the worker's counts).
    """
    workers: list[Worker] = []

    async def run(
        queue: QueueName,
        *,
        jobs: list[AnyJob] | None = None,
        crons: list[CronSchedule] | None = None,
        settings_: Settings | None = None,
        **overrides: Any,
    ) -> Worker:
        kwargs = worker_settings(
            queue, settings_ or settings, burst=True, jobs=jobs, crons=crons or []
        )
        kwargs.update(poll_delay=0, handle_signals=False, **overrides)
        worker = Worker(**kwargs)
        workers.append(worker)
        await worker.async_run()
        return worker

    yield run
    for worker in workers:
        await worker.close()


@pytest.fixture
async def open_ctx(settings: Settings, arq_redis: ArqRedis) -> AsyncIterator[CtxOpener]:
    """`ctx = await open_ctx("exports", storage=...)`: the real startup's ctx, to call a job."""
    opener = CtxOpener(settings, arq_redis)
    yield opener
    await opener.close()


@pytest.fixture
async def user_id(sessions: async_sessionmaker[AsyncSession]) -> uuid.UUID:
    """A platform user, inserted the way CONTRACT §7 says any client may."""
    return await new_user(sessions)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    """moto's S3 server on a loopback port, with dummy AWS credentials while it runs."""
    # Imported here: moto is slow to import, and most test runs need no S3.
    from tests.support.s3_server import TEST_PART_SIZE_BYTES, S3TestServer, fake_aws_credentials

    with fake_aws_credentials():
        server = S3TestServer(min_part_size_bytes=TEST_PART_SIZE_BYTES)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3TestServer) -> str:
    """A fresh, empty bucket per test, so listings only show what the test did."""
    name = f"c360-test-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_settings(settings: Settings, s3_server: S3TestServer, s3_bucket: str) -> Settings:
    """The test settings with S3 storage on the moto server and this test's bucket."""
    return settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_bucket": s3_bucket,
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_region": "us-east-1",
        }
    )

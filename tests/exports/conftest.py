"""Fixtures for the export tests: moto's S3 server, S3 storages, a PostgreSQL connection."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import pytest
from aiobotocore.config import AioConfig
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from jobs.exports.csv_format import neutralize_function_sql
from tests.exports.factories import make_ctx
from tests.support.s3_server import S3TestServer, fake_aws_credentials
from worker.context import Ctx
from worker.settings import Settings
from worker.storage import LocalStorage, S3ClientFactory, S3Storage, s3_client_factory

#: Small parts so multipart is exercised with kilobytes, not megabytes. moto's minimum is
#: lowered to the same value, so moto still rejects any non-last part smaller than ours.
TEST_PART_SIZE_BYTES = 256 * 1024

#: No client-side retries and short timeouts: failures show up at once in tests.
TEST_CLIENT_CONFIG = AioConfig(
    connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 1}
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    with fake_aws_credentials():
        server = S3TestServer(min_part_size_bytes=TEST_PART_SIZE_BYTES)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def aioboto3_session(s3_server: S3TestServer) -> aioboto3.Session:
    # Created inside the fake credentials, like the worker's startup creates its one session.
    return aioboto3.Session()


@pytest.fixture
def s3_bucket(s3_server: S3TestServer) -> str:
    """A fresh, empty bucket per test, so listings only show what the test did."""
    name = f"exports-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_settings(s3_server: S3TestServer, s3_bucket: str) -> Settings:
    return Settings(
        storage_backend="s3",
        s3_bucket=s3_bucket,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region="us-east-1",
    )


@pytest.fixture
def s3_factory(aioboto3_session: aioboto3.Session, s3_settings: Settings) -> S3ClientFactory:
    return s3_client_factory(aioboto3_session, s3_settings, config=TEST_CLIENT_CONFIG)


@pytest.fixture
def s3_storage(s3_factory: S3ClientFactory, s3_bucket: str) -> S3Storage:
    return S3Storage(s3_factory, s3_bucket, part_size_bytes=TEST_PART_SIZE_BYTES)


@pytest.fixture
def s3(s3_server: S3TestServer) -> Any:
    """A sync boto3 client on the moto server, to inspect what the storage left behind."""
    return s3_server.client()


@pytest.fixture(scope="session")
async def pg() -> AsyncIterator[asyncpg.Connection]:
    """One connection to the server's `postgres` database with `pg_temp.csv_safe` defined.

    A temporary-schema function disappears with the connection: nothing is left behind.
    """
    url = Settings().database
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database="postgres"
    )
    try:
        await conn.execute(neutralize_function_sql("pg_temp.csv_safe"))
        yield conn
    finally:
        await conn.close()


# Jobs called directly (not through a worker): a Ctx over local storage in the test's tmp dir.
@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "exports")


@pytest.fixture
def ctx(
    settings: Settings,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    storage: LocalStorage,
    arq_redis: ArqRedis,
) -> Ctx:
    return make_ctx(settings, engine, sessions, storage, arq_redis)

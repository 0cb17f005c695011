"""Fixtures for the export tests: S3 storages on the rig's moto server, a PostgreSQL connection,
and a job ctx over local storage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import pytest
from aiobotocore.config import AioConfig

from jobs.exports.csv_format import neutralize_function_sql
from tests.support.ctx import CtxOpener
from tests.support.s3_server import TEST_PART_SIZE_BYTES, S3TestServer
from worker.context import Ctx
from worker.settings import Settings
from worker.storage import LocalStorage, S3ClientFactory, S3Storage, s3_client_factory

#: No client-side retries and short timeouts: failures show up at once in tests.
TEST_CLIENT_CONFIG = AioConfig(
    connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 1}
)


@pytest.fixture(scope="session")
def aioboto3_session(s3_server: S3TestServer) -> aioboto3.Session:
    # Created inside the fake credentials, like the worker's startup creates its one session.
    return aioboto3.Session()


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
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the test server's `postgres` database with `pg_temp.csv_safe` defined.

    A temporary-schema function disappears with the connection: nothing is left behind.
    """
    url = settings.database
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
async def ctx(open_ctx: CtxOpener, storage: LocalStorage) -> Ctx:
    return await open_ctx("exports", storage=storage)

"""PgBouncer in transaction pooling mode, as a real process of the tests' own.

Debian's `pgbouncer` (1.18: no protocol-level prepared statements) listens on a free loopback
port with `pool_mode = transaction` and a server pool of `POOL_SIZE` connections per database,
fewer than the clients the tests open. `*` forwards any database name to the local trust
PostgreSQL, so the session's test database (migrated directly, by the root conftest) is
reached through it under its own name; `DUO_DATABASE` is an alias of that database with a
pool of two server connections, so a test can tell which one a transaction gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.pgbouncer import pgbouncer as run_pgbouncer
from db.session import create_engine, make_sessionmaker
from worker.client import JobsClient
from worker.settings import Settings

POOL_SIZE = 3
DUO_DATABASE = "c360_duo"


@dataclass(frozen=True)
class PgBouncer:
    port: int
    database: str  # the test database, reached through the pooler under its own name

    def url(self, database: str | None = None) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database or self.database}"


@pytest.fixture(scope="session")
def pgbouncer(settings: Settings) -> Iterator[PgBouncer]:
    database = settings.database.database or ""
    with run_pgbouncer(
        pg_port=settings.database.port or 5432,
        pool_size=POOL_SIZE,
        aliases={DUO_DATABASE: f"dbname={database} pool_size=2"},
    ) as running:
        yield PgBouncer(running.port, database)


@pytest.fixture
def pooled_settings(settings: Settings, pgbouncer: PgBouncer) -> Settings:
    """The test settings with DATABASE_URL at PgBouncer and DATABASE_POOLER=pgbouncer."""
    return settings.model_copy(
        update={"database_url": pgbouncer.url(), "database_pooler": "pgbouncer"}
    )


@pytest.fixture
async def pooled_sessions(
    pooled_settings: Settings,
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(pooled_settings.database, pooler="pgbouncer")
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
def pooled_client(
    arq_redis: ArqRedis,
    pooled_sessions: async_sessionmaker[AsyncSession],
    pooled_settings: Settings,
) -> JobsClient:
    """A web app's client whose every statement goes through PgBouncer."""
    return JobsClient(redis=arq_redis, sessions=pooled_sessions, settings=pooled_settings)

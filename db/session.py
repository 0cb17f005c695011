"""The async engine and session factory: one engine per process and event loop.

`db` imports nothing of `worker` or `jobs` (tests/foundation/test_db_boundary.py): callers
pass the database URL, as arq's `create_pool` takes its own settings and not ours.
"""

from __future__ import annotations

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def create_engine(
    url: URL,
    *,
    pool_size: int = 10,
    pre_ping: bool = False,
    application_name: str = "contact360-worker",
) -> AsyncEngine:
    """An asyncpg engine for one process and event loop.

    Workers run without `pool_pre_ping`: it costs a round trip per checkout (two per email
    sent), and a connection PostgreSQL dropped fails its statement instead, SQLAlchemy
    invalidates it, and the retry policy (`worker/retry.py`) classifies that as transient, so
    the job runs again on a fresh one. A web app's client has no such retry: it pings.
    """
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": application_name}},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (no lazy IO on a closed session)."""
    return async_sessionmaker(engine, expire_on_commit=False)


"""The async engine and session factory: one engine per process and event loop."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from worker.settings import Settings


def create_engine(
    settings: Settings, *, pool_size: int = 10, pre_ping: bool = False
) -> AsyncEngine:
    """An asyncpg engine for one process and event loop.

    Workers run without `pool_pre_ping`: it costs a round trip per checkout (two per email
    sent), and a connection PostgreSQL dropped fails its statement instead, SQLAlchemy
    invalidates it, and the retry policy (`worker/retry.py`) classifies that as transient, so
    the job runs again on a fresh one. A web app's client has no such retry: it pings.
    """
    return create_async_engine(
        settings.database,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "contact360-worker"}},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (no lazy IO on a closed session)."""
    return async_sessionmaker(engine, expire_on_commit=False)

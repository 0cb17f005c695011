"""The async engine and session factory: one engine per process and event loop."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from worker.settings import Settings


def create_engine(settings: Settings, *, pool_size: int = 10) -> AsyncEngine:
    """An asyncpg engine; `pool_pre_ping` replaces connections PostgreSQL has dropped."""
    return create_async_engine(
        settings.database,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        # A connection killed by pg_terminate_backend or a restart is recycled, not reused.
        pool_recycle=1800,
        connect_args={"server_settings": {"application_name": "contact360-worker"}},
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (no lazy IO on a closed session)."""
    return async_sessionmaker(engine, expire_on_commit=False)

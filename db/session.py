"""The async engine and session factory: one engine per process and event loop.

`db` imports nothing of `worker` or `jobs` (tests/foundation/test_db_boundary.py): callers
pass the database URL, as arq's `create_pool` takes its own settings and not ours.
"""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

# What sits between the workers and PostgreSQL (`DATABASE_POOLER`, worker/settings.py).
Pooler = Literal["none", "pgbouncer"]


def create_engine(
    url: URL,
    *,
    pool_size: int = 10,
    pre_ping: bool = False,
    application_name: str = "contact360-worker",
    pooler: Pooler = "none",
) -> AsyncEngine:
    """An asyncpg engine for one process and event loop.

    Workers run without `pool_pre_ping`: it costs a round trip per checkout (two per email
    sent), and a connection PostgreSQL dropped fails its statement instead, SQLAlchemy
    invalidates it, and the retry policy (`worker/retry.py`) classifies that as transient, so
    the job runs again on a fresh one. A web app's client has no such retry: it pings.

    `pooler="pgbouncer"`: `url` is PgBouncer in transaction pooling mode (`pooler_connect_args`).
    """
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args={
            "server_settings": {"application_name": application_name},
            **pooler_connect_args(pooler),
        },
    )


def pooler_connect_args(pooler: Pooler) -> dict[str, Any]:
    """asyncpg connect arguments for the pool between us and PostgreSQL.

    Behind PgBouncer in transaction mode, each transaction may run on another server
    connection, and a server connection serves many clients in turn. A named prepared
    statement then either is missing on the next server ("prepared statement ... does not
    exist") or collides with another client's of the same name ("... already exists"). With
    both caches off, asyncpg (>= 0.29) prepares every statement unnamed and re-parses it with
    its Bind, and SQLAlchemy's dialect asks for unnamed ones too: nothing outlives the
    statement. Every statement of ours runs inside an explicit transaction (SQLAlchemy's
    asyncpg dialect always begins one; raw asyncpg work uses `connection.transaction()`), so
    the server stays the same from BEGIN to COMMIT. `application_name` is a startup parameter
    PgBouncer itself tracks per client, so `ignore_startup_parameters` is not needed.
    Costs one extra Parse per statement (bench-import-pooler measures it).
    """
    if pooler == "none":
        return {}
    return {
        "statement_cache_size": 0,  # asyncpg's own cache of named statements
        "prepared_statement_cache_size": 0,  # SQLAlchemy's asyncpg dialect's cache
    }


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (no lazy IO on a closed session)."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def driver_connection(source: AsyncSession | AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a session or connection, for COPY and plain round trips.

    It is the same backend, in the same transaction (a session begins one here if it has
    none); it stays the caller's: close or commit through `source`, not through the result.
    """
    connection = await source.connection() if isinstance(source, AsyncSession) else source
    raw = (await connection.get_raw_connection()).driver_connection
    if not isinstance(raw, asyncpg.Connection):
        # None once SQLAlchemy has invalidated the connection; another type: not asyncpg.
        raise RuntimeError(
            f"expected an asyncpg connection under {type(source).__name__}, got "
            f"{type(raw).__name__}; the engine must use postgresql+asyncpg://"
        )
    return raw

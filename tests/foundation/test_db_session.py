"""`db.session.driver_connection`: the asyncpg connection under a session is its backend and
its transaction, so raw COPY and the ORM's statements commit or roll back together."""

from __future__ import annotations

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from db.session import driver_connection

_TRANSACTION = "SELECT pg_backend_pid(), txid_current()"


async def test_a_sessions_driver_connection_shares_its_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session:
        orm = (await session.execute(text(_TRANSACTION))).one()
        raw = await driver_connection(session)
        assert isinstance(raw, asyncpg.Connection)
        assert tuple(await raw.fetchrow(_TRANSACTION) or ()) == tuple(orm)
        await session.rollback()


async def test_a_connections_driver_connection_is_its_backend(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        pid = await connection.scalar(text("SELECT pg_backend_pid()"))
        raw = await driver_connection(connection)
        assert await raw.fetchval("SELECT pg_backend_pid()") == pid

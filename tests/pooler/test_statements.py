"""Through PgBouncer in transaction mode: the default driver settings break, `pgbouncer` holds.

With the statement caches on (DATABASE_POOLER=none), asyncpg prepares each statement once
per client connection under a name (`__asyncpg_stmt_<n>__`) and reuses it; behind a
transaction pooler the next transaction may run on another server connection, where that
name does not exist (or another process's statement has it). With DATABASE_POOLER=pgbouncer
every statement is unnamed and lives only as long as its transaction.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from db.migrate import alembic_config, upgrade
from db.session import Pooler, create_engine, make_sessionmaker
from tests.pooler.conftest import DUO_DATABASE, POOL_SIZE, PgBouncer
from tests.support.users import new_user
from worker.settings import Settings

PREPARED_STATEMENT_ERROR = r"prepared statement \"?__asyncpg_stmt_\w+\"? (already|does not) exist"


async def same_statement_on_another_server(engine: AsyncEngine) -> list[Any]:
    """One client runs a statement, then the same one again while another client holds the
    server connection it used (PgBouncer hands out the most recently used one first), on
    the alias of two server connections: the second run is on the other server."""
    async with engine.connect() as client, engine.connect() as holder:
        found = [await client.scalar(text("SELECT CAST(:n AS int) + 1"), {"n": 1})]
        await client.commit()
        await holder.execute(text("SELECT 1"))  # its transaction stays open: server taken
        found.append(await client.scalar(text("SELECT CAST(:n AS int) + 1"), {"n": 2}))
        await client.commit()
        await holder.rollback()
    return found


@pytest.mark.parametrize("pooler", ["none", "pgbouncer"])
async def test_prepared_statements_collide_unless_the_pooler_setting_is_on(
    pgbouncer: PgBouncer, pooler: Pooler
) -> None:
    engine = create_engine(make_url(pgbouncer.url(DUO_DATABASE)), pool_size=2, pooler=pooler)
    try:
        if pooler == "none":
            with pytest.raises(DBAPIError, match=PREPARED_STATEMENT_ERROR):
                await same_statement_on_another_server(engine)
        else:
            assert await same_statement_on_another_server(engine) == [2, 3]
    finally:
        await engine.dispose()


async def test_more_clients_than_server_connections_all_get_served(
    pooled_settings: Settings,
) -> None:
    """Twelve clients at once, each with several transactions of typed parameters, JSON,
    an ORM-style insert and a read back, over `POOL_SIZE` server connections."""
    engine = create_engine(pooled_settings.database, pool_size=12, pooler="pgbouncer")
    try:
        sessions = make_sessionmaker(engine)

        async def client(n: int) -> set[int]:
            pids = set()
            for _ in range(3):
                async with sessions.begin() as session:
                    pids.add(await session.scalar(text("SELECT pg_backend_pid()")))
                    # Held a moment: the twelve transactions overlap and must queue.
                    await session.execute(text("SELECT pg_sleep(0.02)"))
                    assert await session.scalar(
                        text("SELECT CAST(:doc AS jsonb) ->> 'n'"), {"doc": f'{{"n": {n}}}'}
                    ) == str(n)
            user = await new_user(sessions)
            async with sessions() as session:
                assert (
                    await session.scalar(
                        text("SELECT count(*) FROM users WHERE id = :id"), {"id": user}
                    )
                    == 1
                )
            return pids

        seen = await asyncio.gather(*(client(n) for n in range(12)))
    finally:
        await engine.dispose()
    servers = set().union(*seen)
    assert 1 <= len(servers) <= POOL_SIZE  # twelve clients, at most three backends


async def test_migrate_creates_and_upgrades_a_database_through_the_pooler(
    pgbouncer: PgBouncer,
) -> None:
    name = f"c360_pooled_migrations_{uuid.uuid4().hex[:8]}"
    try:
        # `python -m worker migrate` with DATABASE_URL at PgBouncer and the setting on.
        await upgrade(make_url(pgbouncer.url(name)), pooler="pgbouncer")
        direct = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
        try:
            version = await direct.fetchval("SELECT version_num FROM alembic_version")
            columns = await direct.fetch(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'contact_import_jobs' AND column_name LIKE 'lease_%'"
            )
        finally:
            await direct.close()
        assert (
            version
            == ScriptDirectory.from_config(
                alembic_config(make_url(pgbouncer.url(name)))
            ).get_current_head()
        )
        assert {row["column_name"] for row in columns} == {"lease_owner", "lease_expires_at"}
    finally:
        admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

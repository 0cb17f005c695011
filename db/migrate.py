"""Create the database if it is missing, then run Alembic (`python -m worker migrate`: head).

Every function takes the database URL (`Settings.database` in the worker), not our Settings.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from db.session import Pooler, pooler_connect_args

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: URL, pooler: Pooler = "none") -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # migrations/env.py builds its engine with the same connect arguments as the workers'.
    config.attributes["pooler"] = pooler
    # ConfigParser treats % as interpolation: a password with % must be escaped.
    rendered = url.render_as_string(hide_password=False).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", rendered)
    return config


async def create_database_if_missing(url: URL, pooler: Pooler = "none") -> bool:
    """Create the database `url` names; True when it had to be created.

    Through PgBouncer this needs a pool for the `postgres` database (the compose profile's
    PgBouncer has a `*` entry), as it needs one for any database.
    """
    server = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database="postgres",
        statement_cache_size=pooler_connect_args(pooler).get("statement_cache_size", 100),
    )
    try:
        exists = await server.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", url.database)
        if exists:
            return False
        quoted = '"' + (url.database or "").replace('"', '""') + '"'
        await server.execute(f"CREATE DATABASE {quoted}")
        log.info("created database %s", url.database)
        return True
    finally:
        await server.close()


async def upgrade(url: URL, revision: str = "head", *, pooler: Pooler = "none") -> None:
    await create_database_if_missing(url, pooler)
    await asyncio.to_thread(command.upgrade, alembic_config(url, pooler), revision)


async def downgrade(url: URL, revision: str, *, pooler: Pooler = "none") -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(url, pooler), revision)

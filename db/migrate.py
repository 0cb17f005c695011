"""`python -m worker migrate`: create the database if it is missing, then upgrade to head."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config

from worker.settings import Settings

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser treats % as interpolation: a password with % must be escaped.
    url = settings.database.render_as_string(hide_password=False).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", url)
    return config


async def create_database_if_missing(settings: Settings) -> bool:
    """Create the database `DATABASE_URL` names; True when it had to be created."""
    url = settings.database
    server = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database="postgres",
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


async def upgrade(settings: Settings, revision: str = "head") -> None:
    await create_database_if_missing(settings)
    await asyncio.to_thread(command.upgrade, alembic_config(settings), revision)


async def downgrade(settings: Settings, revision: str) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(settings), revision)

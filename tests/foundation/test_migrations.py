"""Alembic: the first migration creates everything and downgrades; CONTRACT inserts work."""

from __future__ import annotations

import importlib
import io
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any, get_args

import asyncpg
import pytest
from alembic import command
from sqlalchemy.engine import make_url

from db.migrate import alembic_config, downgrade, upgrade
from db.models import (
    Base,
    EmailEventProvider,
    EmailStatusName,
    ExportKind,
    ExportStatusName,
    ImportStatusName,
    SuppressionReason,
)
from jobs.exports.csv_format import NEUTRALIZE_FUNCTION_SQL
from tests.conftest import PG_SERVER, _admin
from worker.settings import Settings

PLAIN_SERVER = PG_SERVER.replace("+asyncpg", "")


@pytest.fixture
async def scratch_settings() -> AsyncIterator[Settings]:
    name = f"c360_migrations_{uuid.uuid4().hex[:8]}"
    yield Settings(database_url=f"{PG_SERVER}/{name}")
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _tables(settings: Settings) -> set[str]:
    connection = await asyncpg.connect(f"{PLAIN_SERVER}/{settings.database.database}")
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await connection.close()
    return {row["tablename"] for row in rows}


async def test_migrate_creates_the_database_then_upgrades_and_downgrades(
    scratch_settings: Settings,
) -> None:
    await upgrade(scratch_settings.database)  # the database does not exist yet
    expected = {table.name for table in Base.metadata.sorted_tables}
    assert await _tables(scratch_settings) == expected | {"alembic_version"}
    await downgrade(scratch_settings.database, "base")
    assert await _tables(scratch_settings) == {"alembic_version"}
    await upgrade(scratch_settings.database)
    assert await _tables(scratch_settings) == expected | {"alembic_version"}


async def test_contract_inserts_work_with_defaults(settings: Settings) -> None:
    connection = await asyncpg.connect(f"{PLAIN_SERVER}/{settings.database.database}")
    try:
        user_id = uuid.uuid4()
        await connection.execute("INSERT INTO users (id, email) VALUES ($1, $2)", user_id, "a@b.co")
        await connection.execute(
            "INSERT INTO contacts (user_id, email) VALUES ($1, $2)", user_id, "Ann@Example.com"
        )
        user = await connection.fetchrow("SELECT plan, trial_ends_at > now() AS open FROM users")
        assert user is not None and (user["plan"], user["open"]) == ("trial", True)
        contact = await connection.fetchrow("SELECT id, created_at, updated_at FROM contacts")
        assert (
            contact is not None and contact["id"] is not None and contact["created_at"] is not None
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(
                "INSERT INTO contacts (user_id, email) VALUES ($1, $2)", user_id, "ann@example.COM"
            )
    finally:
        await connection.close()


def test_csv_safe_migration_matches_the_exporters_definition() -> None:
    migration = importlib.import_module("db.migrations.versions.0002_csv_safe_function")
    assert migration.CSV_SAFE_SQL == NEUTRALIZE_FUNCTION_SQL


# Each CHECK constraint of the migrated schema and the Literal whose values it must allow.
CHECKED_COLUMNS: dict[tuple[str, str], Any] = {
    ("contact_import_jobs", "status_known"): ImportStatusName,
    ("exports", "status_known"): ExportStatusName,
    ("exports", "kind_known"): ExportKind,
    ("email_messages", "status_known"): EmailStatusName,
    ("email_suppressions", "reason_known"): SuppressionReason,
    ("email_events", "provider_known"): EmailEventProvider,
}
# CHECK constraints that are not a list of allowed values.
OTHER_CHECKS = {("email_suppressions", "email_lower_case")}


async def test_check_constraints_allow_exactly_the_status_literals(settings: Settings) -> None:
    """The migrations are the schema's history and the Literals the code's: they must agree."""
    connection = await asyncpg.connect(f"{PLAIN_SERVER}/{settings.database.database}")
    try:
        rows = await connection.fetch(
            """
            SELECT rel.relname AS table_name, con.conname AS name,
                   pg_get_constraintdef(con.oid) AS definition
            FROM pg_constraint con JOIN pg_class rel ON rel.oid = con.conrelid
            WHERE con.contype = 'c' AND rel.relnamespace = 'public'::regnamespace
            """
        )
    finally:
        await connection.close()
    found = {(row["table_name"], row["name"]): row["definition"] for row in rows}
    assert set(found) == set(CHECKED_COLUMNS) | OTHER_CHECKS
    for key, literal in CHECKED_COLUMNS.items():
        # PostgreSQL spells `status IN ('a', 'b')` as `CHECK ((status = ANY (ARRAY['a'::text, ...`.
        allowed = re.findall(r"'([^']*)'::text", found[key])
        assert sorted(allowed) == sorted(get_args(literal)), key


def _offline_sql(revisions: str, *, down: bool = False) -> list[str]:
    """The statements alembic runs for `revisions` ("0006:0007"), rendered without a database."""
    config = alembic_config(make_url(f"{PG_SERVER}/offline"))
    buffer = io.StringIO()
    config.output_buffer = buffer
    (command.downgrade if down else command.upgrade)(config, revisions, sql=True)
    lines = buffer.getvalue().splitlines()
    text = "\n".join(line for line in lines if not line.startswith("--"))  # comments
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def _outside_a_transaction(statements: list[str], wanted: str) -> bool:
    in_transaction = False
    for statement in statements:
        if statement == "BEGIN":
            in_transaction = True
        elif statement == "COMMIT":
            in_transaction = False
        elif statement == wanted:
            return not in_transaction
    raise AssertionError(f"{wanted!r} not among {statements}")


def test_the_outbox_batch_index_is_built_and_dropped_without_blocking_writes() -> None:
    # CONCURRENTLY, which PostgreSQL refuses inside a transaction block: both must hold.
    created = "CREATE INDEX CONCURRENTLY ix_email_messages_batch_id ON email_messages (batch_id)"
    assert _outside_a_transaction(_offline_sql("0006:0007"), created)
    dropped = "DROP INDEX CONCURRENTLY ix_email_messages_batch_id"
    assert _outside_a_transaction(_offline_sql("0007:0006", down=True), dropped)


async def test_the_outbox_batch_index_is_valid_after_upgrade_and_gone_after_downgrade(
    scratch_settings: Settings,
) -> None:
    query = (
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " WHERE c.relname = 'ix_email_messages_batch_id'"
    )

    async def validity() -> list[bool]:
        connection = await asyncpg.connect(f"{PLAIN_SERVER}/{scratch_settings.database.database}")
        try:
            return [row["indisvalid"] for row in await connection.fetch(query)]
        finally:
            await connection.close()

    await upgrade(scratch_settings.database, "0007")
    assert await validity() == [True]
    await downgrade(scratch_settings.database, "0006")
    assert await validity() == []
    await upgrade(scratch_settings.database, "0007")
    assert await validity() == [True]

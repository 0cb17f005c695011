"""The contact columns are defined once (`jobs.imports.columns`); what lists them agrees."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from jobs.exports.csv_format import CONTACT_COLUMNS as EXPORT_COLUMNS
from jobs.imports.columns import CANONICAL_COLUMNS, COLUMNS, TEXT_COLUMNS
from jobs.imports.headers import ALIASES, map_header
from jobs.imports.merge import (
    CREATE_STAGING,
    STAGING_COLUMNS,
    STAGING_TABLE,
    BatchCounts,
    merge_part,
    prepare,
    upsert_companies,
)
from jobs.imports.validate import ContactRow


def test_contact_row_is_the_staging_row_of_the_definition() -> None:
    # The validator builds rows and the COPY encodes them by position in this order.
    assert ContactRow._fields == STAGING_COLUMNS == ("row_number", *CANONICAL_COLUMNS)


def test_email_comes_first_tags_last_and_plain_text_between() -> None:
    assert (CANONICAL_COLUMNS[0], CANONICAL_COLUMNS[-1]) == ("email", "tags")
    assert [column.staging_type for column in COLUMNS] == [
        "text",
        *["text"] * len(TEXT_COLUMNS),
        "text[]",
    ]


def test_every_column_is_found_by_its_own_name_and_no_alias_is_shared() -> None:
    assert map_header(CANONICAL_COLUMNS).indexes == {
        name: index for index, name in enumerate(CANONICAL_COLUMNS)
    }
    # A dict keeps only the last column of an alias listed twice: count them all.
    assert len(ALIASES) == sum(len(column.aliases) for column in COLUMNS)


def test_the_export_writes_every_imported_column() -> None:
    assert [name for name in EXPORT_COLUMNS if name in CANONICAL_COLUMNS] == list(CANONICAL_COLUMNS)


@pytest.fixture
async def pg(engine: AsyncEngine) -> AsyncIterator[Any]:
    async with engine.connect() as connection:
        yield (await connection.get_raw_connection()).driver_connection


async def test_the_staging_table_has_the_definitions_columns_and_types(pg: Any) -> None:
    async with pg.transaction():
        await pg.execute(CREATE_STAGING)
        found = await pg.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            f"pg_temp.{STAGING_TABLE}",
        )
    assert [tuple(record) for record in found] == [
        ("row_number", "integer"),
        *((column.name, column.staging_type) for column in COLUMNS),
    ]


def _every_column_set(version: str) -> ContactRow:
    values: dict[str, Any] = {name: f"{name} {version}" for name in TEXT_COLUMNS}
    return ContactRow(row_number=2, email="every@x.io", **values, tags=[f"tag {version}", "shared"])


async def _merge_one(pg: Any, user_id: uuid.UUID, row: ContactRow) -> BatchCounts:
    batch = prepare([row], [], data_rows=1)
    async with pg.transaction():
        await upsert_companies(pg, user_id, batch.company_names)
    counts = []
    for part in batch.parts:  # each in its own transaction, as the job merges them
        async with pg.transaction():
            counts.append(await merge_part(pg, user_id, uuid.uuid4(), part, 0))
    return BatchCounts(
        created=sum(c.created for c in counts),
        updated=sum(c.updated for c in counts),
        errors=sum(c.errors for c in counts),
    )


async def _stored(pg: Any, user_id: uuid.UUID) -> ContactRow:
    """The user's one contact, read back by column name (the company by its name)."""
    record = await pg.fetchrow(
        "SELECT c.*, co.name AS company_name FROM contacts c "
        "LEFT JOIN companies co ON co.id = c.company_id WHERE c.user_id = $1",
        user_id,
    )
    stored = {name: record[name] for name in CANONICAL_COLUMNS if name != "company"}
    return ContactRow(row_number=2, company=record["company_name"], **stored)


async def test_a_row_with_every_column_set_is_stored_and_updated_whole(
    pg: Any, user_id: uuid.UUID
) -> None:
    first, second = _every_column_set("one"), _every_column_set("two")
    assert await _merge_one(pg, user_id, first) == BatchCounts(created=1, updated=0, errors=0)
    assert await _stored(pg, user_id) == first
    # Every column changes: each one the update leaves out would keep its first value.
    assert await _merge_one(pg, user_id, second) == BatchCounts(created=0, updated=1, errors=0)
    assert await _stored(pg, user_id) == second

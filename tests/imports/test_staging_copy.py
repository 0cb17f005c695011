"""The staging rows' COPY text: every value arrives in PostgreSQL exactly as Python held it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from db.session import driver_connection
from jobs.imports.merge import CREATE_STAGING, STAGING_COLUMNS, STAGING_TABLE
from jobs.imports.staging_copy import copy_text
from jobs.imports.validate import ContactRow

# Each breaks the fast path's counts in its own way (or looks like the NULL marker).
SPECIAL_VALUES = ["a\tb", "a\nb", "a\rb", "a\r\nb", "back\\slash", "\\N", "\\", "ends\\"]
SPECIAL_TAGS = [['say "hi"'], ["c:\\dir"], ["{braces}", "NULL"], ["with space", "a\tb"]]


def _row(number: int, **values: Any) -> ContactRow:
    row: dict[str, Any] = dict.fromkeys(ContactRow._fields)
    row.update(row_number=number, email=f"p{number}@x.io", **values)
    return ContactRow(**row)


def _clean_rows(count: int) -> list[ContactRow]:
    return [
        _row(
            n,
            first_name="Zoë",
            last_name="王" if n % 2 else None,
            city="القاهرة",
            company="Acme, Inc.",
            tags=["vip", "🙂"] if n % 3 else None,
        )
        for n in range(2, 2 + count)
    ]


@pytest.fixture
async def staging(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    async with engine.connect() as connection:
        raw = await driver_connection(connection)
        async with raw.transaction():
            await raw.execute(CREATE_STAGING)
            yield raw


async def _round_trip(connection: asyncpg.Connection, rows: list[ContactRow]) -> list[ContactRow]:
    await connection.execute(f"TRUNCATE {STAGING_TABLE}")
    await connection.copy_to_table(
        STAGING_TABLE,
        source=memoryview(copy_text(rows)),  # type: ignore[arg-type]  # as in merge.merge_part
        columns=STAGING_COLUMNS,
        format="text",
    )
    stored = await connection.fetch(
        f"SELECT {', '.join(STAGING_COLUMNS)} FROM {STAGING_TABLE} ORDER BY row_number"
    )
    return [ContactRow(**record) for record in stored]


async def test_clean_rows_arrive_unchanged(staging: asyncpg.Connection) -> None:
    rows = _clean_rows(50)
    assert await _round_trip(staging, rows) == rows


@pytest.mark.parametrize("value", SPECIAL_VALUES)
async def test_one_special_value_among_clean_rows_arrives_unchanged(
    staging: asyncpg.Connection, value: str
) -> None:
    rows = [*_clean_rows(5), _row(99, first_name=value, phone="+1 555"), *_clean_rows(3)]
    rows.sort(key=lambda row: row.row_number)
    assert await _round_trip(staging, rows) == rows


@pytest.mark.parametrize("tags", SPECIAL_TAGS)
async def test_tags_that_need_quoting_arrive_unchanged(
    staging: asyncpg.Connection, tags: list[str]
) -> None:
    rows = [*_clean_rows(4), _row(99, tags=tags)]
    assert await _round_trip(staging, rows) == rows


async def test_every_column_null_but_the_email(staging: asyncpg.Connection) -> None:
    rows = [_row(2), _row(3, tags=["x"])]
    assert await _round_trip(staging, rows) == rows


def test_no_rows_is_no_data() -> None:
    assert copy_text([]) == b""

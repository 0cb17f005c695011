"""Baselines for bench/bench_import.py: the bare SQL merge, the naive ORM import, and the
merge with duplicates collapsed in SQL instead of Python."""

from __future__ import annotations

import csv
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from db.models import Contact
from db.session import create_engine, make_sessionmaker
from jobs.imports.columns import CANONICAL_COLUMNS, COLUMNS, TEXT_COLUMNS
from jobs.imports.headers import map_header
from jobs.imports.merge import (
    CHANGED_CLAUSE,
    CREATE_STAGING,
    SET_CLAUSE,
    STAGING_COLUMNS,
    STAGING_TABLE,
    UPSERT_COMPANIES,
    merge_part,
    prepare,
    upsert_companies,
)
from jobs.imports.reader import CsvReader
from jobs.imports.sources import local_file_source
from jobs.imports.validate import ContactRow, Validator, email_problem
from worker.settings import Settings

# The staged columns stored as they are: not the email (the key) nor the company (linked by id).
_PLAIN = tuple(name for name in TEXT_COLUMNS if name != "company")
_COLUMNS = ", ".join((*_PLAIN, "tags"))
_BARE_COMPANIES = """
INSERT INTO companies (user_id, name)
SELECT DISTINCT ON (lower(company)) $1, company FROM bench_staging
WHERE company IS NOT NULL ORDER BY lower(company), row_number
ON CONFLICT (user_id, lower(name)) DO NOTHING
"""
# The simplest correct one-statement merge: the last row of an email wins whole (DISTINCT ON;
# ON CONFLICT DO UPDATE refuses to touch one row twice), companies linked by a join.
_BARE_CONTACTS = f"""
INSERT INTO contacts AS c (user_id, email, company_id, {_COLUMNS})
SELECT $1, s.email, co.id, {", ".join(f"s.{c}" for c in (*_PLAIN, "tags"))}
FROM (SELECT DISTINCT ON (email) * FROM bench_staging ORDER BY email, row_number DESC) AS s
LEFT JOIN companies AS co ON co.user_id = $1 AND lower(co.name) = lower(s.company)
ON CONFLICT (user_id, lower(email)) DO UPDATE SET {SET_CLAUSE}, updated_at = now()
"""


async def valid_batches(path: Path, batch_rows: int) -> AsyncIterator[tuple[int, list[ContactRow]]]:
    """(data rows, valid rows) per batch, parsed and validated as the job does."""
    reader = await CsvReader.open(local_file_source(path))
    validator = Validator(map_header(reader.header))
    async for batch in reader.batches(max_rows=batch_rows):
        yield len(batch), validator.validate(batch).rows


async def stage_for_bare_merge(pg: asyncpg.Connection, path: Path) -> float:
    """COPY every valid row into `bench_staging` (parsed and validated as the job does);
    returns the seconds that took. `drop_bare_staging` removes the table again."""
    await pg.execute(
        f"CREATE UNLOGGED TABLE bench_staging AS SELECT * FROM (VALUES {_null_row()}) AS v"
        f"({', '.join(STAGING_COLUMNS)}) WHERE false"
    )
    started_s = time.perf_counter()
    async for _, rows in valid_batches(path, 5000):
        await pg.copy_records_to_table("bench_staging", records=rows, columns=STAGING_COLUMNS)
    copy_s = time.perf_counter() - started_s
    await pg.execute("ANALYZE bench_staging")
    return copy_s


async def bare_merge_s(
    pg: asyncpg.Connection, user_id: uuid.UUID, *, guarded: bool = False
) -> float:
    """Seconds of one bare merge of the staged rows (companies first, in one transaction);
    `guarded` adds the job's WHERE that skips updates changing nothing."""
    sql = _BARE_CONTACTS + (f" WHERE {CHANGED_CLAUSE}" if guarded else "")
    started_s = time.perf_counter()
    async with pg.transaction():
        await pg.execute(_BARE_COMPANIES, user_id)
        await pg.execute(sql, user_id)
    return time.perf_counter() - started_s


async def drop_bare_staging(pg: asyncpg.Connection) -> None:
    await pg.execute("DROP TABLE IF EXISTS bench_staging")


def _null_row() -> str:
    types = ["integer", *(column.staging_type for column in COLUMNS)]
    return "(" + ", ".join(f"NULL::{t}" for t in types) + ")"


async def naive_orm(
    settings: Settings, user_id: uuid.UUID, path: Path, rows: int
) -> dict[str, float]:
    """The old system's way: one ORM object per row, a commit every 1,000 rows."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader)
        records = [next(reader) for _ in range(rows)]
    engine = create_engine(settings.database, pooler=settings.database_pooler)
    sessions = make_sessionmaker(engine)
    seen: set[str] = set()
    started_s = time.perf_counter()
    added = 0
    async with sessions() as session:
        for fields in records:
            email = fields[0].strip().lower()
            if email_problem(email or None) or email in seen:
                continue  # the naive import skipped what would break its INSERT
            seen.add(email)
            cleaned = (value.strip() or None for value in fields)
            values = dict(zip(CANONICAL_COLUMNS, cleaned, strict=True))  # the generated header
            tags = values.pop("tags")
            del values["email"], values["company"]  # the email is cleaned; no company lookup
            session.add(
                Contact(
                    user_id=user_id,
                    email=email,
                    tags=tags.split(";") if tags else None,
                    **values,
                )
            )
            added += 1
            if added % 1000 == 0:
                await session.commit()
        await session.commit()
    seconds = time.perf_counter() - started_s
    await engine.dispose()
    return {"rows": rows, "seconds": seconds}


_SQL_COLLAPSE_MERGE = f"""
WITH g AS (
    SELECT email, {
    ", ".join(
        f"(array_agg({c} ORDER BY row_number DESC) FILTER (WHERE {c} IS NOT NULL))[1] AS {c}"
        for c in [*_PLAIN, "company"]
    )
},
           max(row_number) FILTER (WHERE tags IS NOT NULL) AS tags_row
    FROM {STAGING_TABLE} GROUP BY email
), merged AS (
    INSERT INTO contacts AS c (user_id, email, company_id, {_COLUMNS})
    SELECT $1, g.email, co.id, {", ".join(f"g.{c}" for c in _PLAIN)}, t.tags
    FROM g
    LEFT JOIN {STAGING_TABLE} AS t ON t.row_number = g.tags_row
    LEFT JOIN companies AS co ON co.user_id = $1 AND lower(co.name) = lower(g.company)
    ON CONFLICT (user_id, lower(email)) DO UPDATE SET {SET_CLAUSE}, updated_at = now()
    WHERE {CHANGED_CLAUSE}
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) FROM merged
"""


async def merge_variants(
    pg: asyncpg.Connection, user_id: uuid.UUID, path: Path, batch_rows: int
) -> dict[str, float]:
    """Database seconds per approach over the same batches (the job's way first)."""
    batches = [(n, rows) async for n, rows in valid_batches(path, batch_rows)]
    prepare_s = python_s = sql_s = 0.0
    created_python = created_sql = 0
    for data_rows, rows in batches:
        started_s = time.perf_counter()
        prepared = prepare(rows, [], data_rows)
        prepare_s += time.perf_counter() - started_s
        started_s = time.perf_counter()
        async with pg.transaction():
            await upsert_companies(pg, user_id, prepared.company_names)
        for part in prepared.parts:  # one after the other here, each in its own transaction
            async with pg.transaction():
                counts = await merge_part(pg, user_id, uuid.uuid4(), part, 0)
            created_python += counts.created
        python_s += time.perf_counter() - started_s
    await pg.execute("TRUNCATE contacts, companies CASCADE")
    for _, rows in batches:
        started_s = time.perf_counter()
        async with pg.transaction():
            await pg.execute(CREATE_STAGING)
            await pg.copy_records_to_table(STAGING_TABLE, records=rows, columns=STAGING_COLUMNS)
            names = list(dict.fromkeys(r.company for r in rows if r.company is not None))
            await pg.execute(UPSERT_COMPANIES, user_id, names)
            created_sql += int(await pg.fetchval(_SQL_COLLAPSE_MERGE, user_id))
        sql_s += time.perf_counter() - started_s
    assert created_python == created_sql, (created_python, created_sql)
    return {"prepare_s": prepare_s, "python_s": python_s, "sql_s": sql_s}

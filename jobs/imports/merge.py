"""One batch into PostgreSQL: COPY into a staging table, upsert companies, merge contacts.

Why the SQL is shaped this way (speed; figures from bench/bench_import.py on 2 cores):

- Rows reach PostgreSQL by COPY into a temporary table (~350k rows/s), never as parameters
  of one INSERT per row (the old ORM import: ~4k rows/s). The COPY data is encoded on the
  parsing thread (`staging_copy`), so the event loop only sends it.
- Duplicate emails of a batch are collapsed in Python (`collapse`) while the previous batch's
  transaction runs, so the merge is one plain `INSERT ... SELECT ... ON CONFLICT DO UPDATE`
  whose every staging row hits a distinct contact. Collapsing in SQL instead
  (`array_agg(col ORDER BY row_number DESC) FILTER (WHERE col IS NOT NULL)` per column,
  grouped by email, with tags needing a second lookup because arrays of arrays must be
  rectangular) costs a sort and nine aggregates per row inside the transaction: measured
  ~25% more database time per batch (2.95 s vs 2.35 s for 100,000 rows; the Python collapse
  costs 0.07 s, off the transaction's clock).
- `COALESCE(EXCLUDED.col, c.col)` keeps stored values a row leaves empty, and the `WHERE ...
  IS DISTINCT FROM` skips updates that change nothing: a re-import of the same file then
  writes no new row versions (no heap or index churn).
- `RETURNING (xmax = 0)` tells inserts from updates without a lookup per row; created and
  updated counts follow from it (see `BatchCounts`).
- Commits do not wait for the WAL flush (`synchronous_commit = off`, this transaction only):
  the checkpoint commits with the rows, so a batch lost in a server crash is lost together
  with its checkpoint and simply redone by the next run.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from jobs.imports.columns import CANONICAL_COLUMNS, COLUMNS, ContactColumn
from jobs.imports.staging_copy import copy_text
from jobs.imports.validate import ContactRow, RowError

STAGING_TABLE = "import_staging"
STAGING_COLUMNS = ("row_number", *CANONICAL_COLUMNS)  # `ContactRow`'s fields, the COPY order
_STAGING_DEFINITION = ", ".join(
    ["row_number integer", *(f"{column.name} {column.staging_type}" for column in COLUMNS)]
)

# Commits do not wait for the WAL flush (see the module docstring). ON COMMIT DELETE ROWS:
# the table outlives the batch (no catalog churn per batch) but never
# carries rows from one transaction into the next; it lives as long as the pooled connection.
CREATE_STAGING = f"""
SET LOCAL synchronous_commit = off;
CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} (
    {_STAGING_DEFINITION}
) ON COMMIT DELETE ROWS
"""

# The first spelling in file order names the company: DISTINCT ON keeps the lowest ordinal.
UPSERT_COMPANIES = """
INSERT INTO companies (user_id, name)
SELECT $1, name FROM (
    SELECT DISTINCT ON (lower(name)) name, ord
    FROM unnest($2::text[]) WITH ORDINALITY AS t(name, ord)
    ORDER BY lower(name), ord
) AS firsts
ORDER BY ord
ON CONFLICT (user_id, lower(name)) DO NOTHING
"""


def _staged_value(column: ContactColumn) -> str:
    # The company arrives by name; it is stored as the id the join on companies finds.
    return "co.id" if column.name == "company" else f"s.{column.name}"


# What the merge writes into `contacts`, all in `columns.COLUMNS` order: the columns, the
# staged values, and the columns an update may change (all but the email, the conflict key).
_INSERT_COLUMNS = ", ".join(column.contacts_column for column in COLUMNS)
_INSERT_VALUES = ", ".join(map(_staged_value, COLUMNS))
VALUE_COLUMNS = tuple(column.contacts_column for column in COLUMNS if column.name != "email")
SET_CLAUSE = ",\n    ".join(f"{col} = COALESCE(EXCLUDED.{col}, c.{col})" for col in VALUE_COLUMNS)
CHANGED_CLAUSE = " OR ".join(
    f"(EXCLUDED.{col} IS NOT NULL AND EXCLUDED.{col} IS DISTINCT FROM c.{col})"
    for col in VALUE_COLUMNS
)
# $1 user id; $2 import id and $3-$5 the row errors to store (row numbers, messages, JSON
# payloads; empty arrays when none). One statement, so one round trip: the errors' INSERT is a
# data-modifying CTE, which PostgreSQL runs whether or not the query reads it.
MERGE_CONTACTS = f"""
WITH merged AS (
    INSERT INTO contacts AS c (user_id, {_INSERT_COLUMNS})
    SELECT $1, {_INSERT_VALUES}
    FROM {STAGING_TABLE} AS s
    LEFT JOIN companies AS co ON co.user_id = $1 AND lower(co.name) = lower(s.company)
    ON CONFLICT (user_id, lower(email)) DO UPDATE SET
    {SET_CLAUSE},
    updated_at = now()
    WHERE {CHANGED_CLAUSE}
    RETURNING (xmax = 0) AS inserted
), stored_errors AS (
    INSERT INTO contact_import_errors (job_id, row_number, message, payload)
    SELECT $2, r, m, p::jsonb FROM unnest($3::integer[], $4::text[], $5::text[]) AS t(r, m, p)
    ON CONFLICT (job_id, row_number) DO NOTHING
)
SELECT count(*) FILTER (WHERE inserted) FROM merged
"""


@dataclass(frozen=True)
class PreparedPart:
    """One email-hash part of a batch, ready for its own connection (see `PARTS`)."""

    valid_rows: int  # the valid rows it counts (part 0 also counts the batch's repeated rows)
    staging_rows: int  # its distinct emails, one staging row each
    staging_copy: bytes  # those contacts as COPY text (`staging_copy.copy_text`)
    errors: list[RowError]  # part 0: all the batch's invalid rows, file order; others: none


@dataclass(frozen=True)
class PreparedBatch:
    """A validated batch made ready for the database (built off the transaction's clock)."""

    data_rows: int  # data rows of the file this batch covers (valid + invalid)
    company_names: list[str]  # every non-empty company of a valid row, file order
    parts: list[PreparedPart]


# Each batch is merged as PARTS transactions on as many connections at once: one PostgreSQL
# backend per part, so the merge uses more than one core. Parts are split by a stable hash of
# the (already lower-cased) email, so no two parts ever touch the same contact.
PARTS = 2
ALL_PARTS = (1 << PARTS) - 1


def part_of(email: str) -> int:
    return zlib.crc32(email.encode()) % PARTS


async def upsert_companies(
    connection: asyncpg.Connection, user_id: uuid.UUID, names: list[str]
) -> None:
    """The batch's companies, before its parts (in file order: the first spelling wins)."""
    if names:
        await connection.execute(UPSERT_COMPANIES, user_id, names)


@dataclass(frozen=True)
class BatchCounts:
    """Row-by-row counts: each email group creates at most one contact, every other valid row
    of the group (and every row of a group whose email existed) updated one."""

    created: int
    updated: int
    errors: int


def prepare(rows: Sequence[ContactRow], errors: list[RowError], data_rows: int) -> PreparedBatch:
    """Collapse duplicate emails (`collapse`), split the contacts into parts and encode each
    part's COPY data.

    Part 0 carries the row errors and counts the batch's repeated rows (they update the
    contact their first row created or found), so the parts' counts add up to the batch's.
    """
    contacts = collapse(rows)
    shares: list[list[ContactRow]] = [[] for _ in range(PARTS)]
    for contact in contacts:
        shares[part_of(contact.email)].append(contact)
    repeated = len(rows) - len(contacts)
    parts = [
        PreparedPart(
            valid_rows=len(share) + (repeated if index == 0 else 0),
            staging_rows=len(share),
            staging_copy=copy_text(share),
            errors=errors if index == 0 else [],
        )
        for index, share in enumerate(shares)
    ]
    companies = list(dict.fromkeys(row.company for row in rows if row.company is not None))
    return PreparedBatch(data_rows=data_rows, company_names=companies, parts=parts)


def collapse(rows: Sequence[ContactRow]) -> list[ContactRow]:
    """One row per email, in order of first appearance, as if the rows were applied one after
    the other.

    Per column the last non-empty value wins. Applying that to a stored contact with
    COALESCE gives the same result as applying the rows one by one, which is also why batch
    boundaries cannot change the outcome.
    """
    by_email = dict(zip((row.email for row in rows), rows, strict=True))
    if len(by_email) < len(rows):
        by_email = {}
        for row in rows:
            before = by_email.get(row.email)
            if before is None:
                by_email[row.email] = row
            else:  # keeps the first row's number: the row where the contact first appears
                by_email[row.email] = _overlay(before, row)
    return list(by_email.values())


def _overlay(before: ContactRow, after: ContactRow) -> ContactRow:
    # The email is the same; every other column takes the later row's value unless empty.
    values = [a if a is not None else b for a, b in zip(after[2:], before[2:], strict=True)]
    return ContactRow._make((before.row_number, before.email, *values))


async def merge_part(
    connection: asyncpg.Connection,
    user_id: uuid.UUID,
    import_id: uuid.UUID,
    part: PreparedPart,
    stored_errors_room: int,
) -> BatchCounts:
    """Apply `part` on an asyncpg `connection` inside the caller's open transaction; the
    batch's companies are already committed (`upsert_companies`)."""
    # Both statements in one round trip (simple query protocol, no parameters).
    await connection.execute(CREATE_STAGING)
    if part.staging_rows:
        # A memoryview, not bytes: asyncpg would take bytes for a file name. asyncpg documents
        # buffer-protocol sources (`copy_to_table`); asyncpg-stubs' source type leaves them out.
        await connection.copy_to_table(
            STAGING_TABLE,
            source=memoryview(part.staging_copy),  # type: ignore[arg-type]
            columns=STAGING_COLUMNS,
            format="text",
        )
    stored = part.errors[: max(0, stored_errors_room)]
    if not part.staging_rows and not stored:
        return BatchCounts(created=0, updated=part.valid_rows, errors=len(part.errors))
    created = await connection.fetchval(
        MERGE_CONTACTS,
        user_id,
        import_id,
        [error.row_number for error in stored],
        [error.message for error in stored],
        [error.payload_json for error in stored],  # JSON text made on the parsing thread
    )
    return BatchCounts(created=created, updated=part.valid_rows - created, errors=len(part.errors))

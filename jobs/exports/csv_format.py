"""The export CSV format (CONTRACT §9): column order, and formula-injection neutralisation.

A spreadsheet runs a cell that starts with `=`, `+`, `-` or `@` (or a tab/CR/LF before one) as
a formula (OWASP "CSV Injection"). Such cells get a leading `'`, which spreadsheets show as
text. Values that are plainly numbers or phone numbers (`-12.5`, `+1 (555) 010-0000`) are left
alone: they cannot run anything and users want them intact.

The rule exists twice, kept in agreement by tests against a real PostgreSQL:
- `neutralize(value)` in Python, for values produced outside the database;
- `neutralize_sql(column_sql)` / the `csv_safe(text)` function, so the export can run
  `COPY (SELECT csv_safe(email), ...) TO STDOUT WITH (FORMAT csv, HEADER)` and stream the bytes
  to storage untouched. Neutralising ~13 cells per row in Python caps an export at a fraction
  of COPY's speed; inside PostgreSQL the cost is a few percent (see the module's tests).

Both take a fast path for the common case (first character printable ASCII and not a trigger)
and only then pay for NFKC normalisation, which is what makes full-width equals (U+FF1D) and
other compatibility forms (U+FE62 small plus, U+207C superscript equals, U+3000 ideographic
space) count as their ASCII originals.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime

CONTACT_COLUMNS: tuple[str, ...] = (
    "id",
    "email",
    "first_name",
    "last_name",
    "phone",
    "company",
    "job_title",
    "city",
    "country",
    "linkedin_url",
    "tags",
    "created_at",
    "updated_at",
)
COMPANY_COLUMNS: tuple[str, ...] = (
    "id",
    "name",
    "domain",
    "contacts_count",
    "created_at",
    "updated_at",
)
TAGS_SEPARATOR = ";"

_TRIGGERS = frozenset("=+-@\t\r\n")
# Tried with fullmatch (Python's `$` would also match before a final newline; PostgreSQL's
# does not).
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9 ().-]+")


def neutralize(value: str | None) -> str:
    """`value` with a leading `'` if a spreadsheet could run it as a formula; None is `""`.

    A cell is neutralised when its first character other than spaces, either as written or
    after NFKC normalisation, is `=`, `+`, `-`, `@`, tab, CR or LF, unless the normalised value
    (leading spaces dropped) is plainly numeric or phone-like: `[+-]?[0-9 ().-]+`.
    Checking the raw text too matters for `=` followed by a combining mark, which NFKC
    composes into another character (`=\\u0338` becomes `≠`) though the cell still starts
    with `=`.
    """
    if not value:
        return ""
    first = value[0]
    # Fast path: printable ASCII (not space) normalises to itself and starts no formula.
    if "!" <= first <= "\x7f" and first not in "+-=@":
        return value
    normalized = unicodedata.normalize("NFKC", value).lstrip(" ")
    starts_formula = value.lstrip(" ")[:1] in _TRIGGERS or normalized[:1] in _TRIGGERS
    if starts_formula and not _PLAIN_NUMBER.fullmatch(normalized):
        return "'" + value
    return value


def neutralize_sql(column_sql: str) -> str:
    """A PostgreSQL expression equal to `neutralize` of `column_sql`'s value (NULL stays NULL).

    `column_sql` is pasted as SQL: pass a column reference or expression, never user input.
    COPY writes NULL as an empty cell, which is what `neutralize(None)` returns.
    Needs a UTF8 database (`normalize()` refuses other encodings), PostgreSQL 13 or later.
    """
    x = f"({column_sql})"
    normalized = f"ltrim(normalize({x}, NFKC), ' ')"
    # ascii() is the code point of the first character: 33..127 is printable ASCII but space,
    # 43 '+', 45 '-', 61 '=', 64 '@'. Regex brackets end in '-' so that it is literal;
    # \t \r \n are regex escapes (standard_conforming_strings keeps the backslashes).
    return (
        f"CASE WHEN ascii({x}) BETWEEN 33 AND 127 AND ascii({x}) NOT IN (43, 45, 61, 64) "
        f"THEN {x} "
        f"WHEN ({x} ~ '^ *[=+@\\t\\r\\n-]' OR {normalized} ~ '^[=+@\\t\\r\\n-]') "
        f"AND {normalized} !~ '^[+-]?[0-9 ().-]+$' "
        f"THEN '''' || {x} "
        f"ELSE {x} END"
    )


def neutralize_function_sql(name: str = "csv_safe") -> str:
    """`CREATE OR REPLACE FUNCTION <name>(text)` wrapping `neutralize_sql`.

    A one-expression `LANGUAGE sql` function, IMMUTABLE like everything it calls and not
    STRICT, so the planner inlines it into the query: it costs the same as the bare CASE.
    (STRICT, or a body that is not immutable, would stop the inlining.)
    """
    return (
        f"CREATE OR REPLACE FUNCTION {name}(cell text) RETURNS text\n"
        f"LANGUAGE sql IMMUTABLE PARALLEL SAFE\n"
        f"AS $csv_safe$ SELECT {neutralize_sql('cell')} $csv_safe$"
    )


#: For a migration (copy the text into it: migrations must not change when this module does).
NEUTRALIZE_FUNCTION_SQL = neutralize_function_sql()
DROP_NEUTRALIZE_FUNCTION_SQL = "DROP FUNCTION IF EXISTS csv_safe(text)"


def tags_sql(column_sql: str) -> str:
    """A `text[]` column as one cell, `a;b` (NULL elements skipped, NULL array stays NULL)."""
    return f"array_to_string({column_sql}, '{TAGS_SEPARATOR}')"


def timestamp_sql(column_sql: str) -> str:
    """A `timestamptz` column as ISO 8601 UTC, `2026-11-26T09:00:00Z`, like `format_timestamp`."""
    return f"""to_char(({column_sql}) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""


def format_tags(tags: list[str] | None) -> str:
    return TAGS_SEPARATOR.join(tags or ())


def format_timestamp(value: datetime | None) -> str:
    """ISO 8601 in UTC to the second; a naive datetime is taken to be UTC already."""
    if value is None:
        return ""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")

"""The export CSV format (CONTRACT §9): column order, and formula-injection neutralisation.

A spreadsheet runs a cell that starts with `=`, `+`, `-` or `@` (or a tab/CR/LF before one) as
a formula (OWASP "CSV Injection"). Such cells get a leading `'`, which spreadsheets show as
text. Values that are plainly numbers or phone numbers (`-12.5`, `+1 (555) 010-0000`) are left
alone: they cannot run anything and users want them intact.

The rule exists twice, kept in agreement by tests against a real PostgreSQL:
- `neutralize(value)` in Python, for values produced outside the database;
- `neutralize_sql(column_sql)` / the `csv_safe(text)` function, so the export can run
  `COPY (SELECT csv_safe(email), ...) TO STDOUT WITH (FORMAT csv, HEADER)` and stream the bytes
  to storage untouched. Neutralising 13 cells a row in Python runs at ~0.2x the speed of a
  bare COPY; in PostgreSQL at ~0.6x (200,000 contact-shaped rows, see the export benchmark).

Both decide most cells from their first character alone and only then pay for NFKC
normalisation, which is what makes full-width equals (U+FF1D) and other compatibility forms
(U+FE62 small plus, U+207C superscript equals, U+3000 ideographic space) count as their ASCII
originals.
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


#: Every non-ASCII character whose NFKC form starts with a space or a trigger (Unicode 14,
#: the version of Python 3.11 and PostgreSQL 15; a test recomputes it from both). A cell whose
#: first character is non-ASCII and not one of these is safe without normalising it.
NFKC_SPACE_OR_TRIGGER_CHARS = "".join(
    chr(int(code, 16))
    for code in (  # noqa: SIM905 (a list literal of 80 strings would be 80 lines)
        "00A0 00A8 00AF 00B4 00B8 02D8 02D9 02DA 02DB 02DC 02DD 037A 0384 0385 1FBD 1FBF 1FC0 "
        "1FC1 1FCD 1FCE 1FCF 1FDD 1FDE 1FDF 1FED 1FEE 1FFD 1FFE 2000 2001 2002 2003 2004 2005 "
        "2006 2007 2008 2009 200A 2017 202F 203E 205F 207A 207C 208A 208C 2A75 2A76 3000 309B "
        "309C FB29 FC5E FC5F FC60 FC61 FC62 FC63 FE49 FE4A FE4B FE4C FE62 FE63 FE66 FE6B FE70 "
        "FE72 FE74 FE76 FE78 FE7A FE7C FE7E FF0B FF0D FF1D FF20 FFE3"
    ).split()
)
_SQL_TRIGGER = r"[=+@\t\r\n-]"  # regex escapes; '-' last so it is literal
_SQL_PLAIN_NUMBER = "[+-]?[0-9 ().-]+$"


def neutralize_sql(column_sql: str) -> str:
    """A PostgreSQL expression equal to `neutralize` of `column_sql`'s value (NULL stays NULL).

    `column_sql` is pasted as SQL: pass a column reference or expression, never user input.
    COPY writes NULL as an empty cell, which is what `neutralize(None)` returns.
    Needs a UTF8 database (`normalize()` refuses other encodings), PostgreSQL 13 or later.
    """
    x = f"({column_sql})"
    normalized = f"ltrim(normalize({x}, NFKC), ' ')"
    quoted = f"'''' || {x}"
    # PostgreSQL's normalize() costs 0.3-2 us per short value (it always decomposes and
    # recomposes) and a regex match ~0.25 us, against ~4 us for a whole COPY row. So the
    # branches decide most cells with no regex or one, and normalise only when they must:
    # 1. first character from 'A' (65) to U+0080: letters and harmless punctuation, so safe.
    #    Most cells end here. ascii() is the first character's code point; one ascii() call
    #    and a shift is ~40 ns a cell cheaper than a BETWEEN, which calls ascii() twice.
    # 2. first character a digit: safe.
    # 3. non-ASCII first character that NFKC does not turn into a space or trigger: safe
    #    (canonical composition never produces a space or trigger either).
    # 4. plainly numeric or phone-like: kept. The pattern only matches ASCII, which NFKC
    #    leaves as it is, so matching the raw text is matching the normalised one.
    # 5. all ASCII (as many bytes as characters): NFKC is the identity, test the raw text.
    # 6. the rule as written.
    return (
        f"CASE WHEN (ascii({x}) - 65) >> 6 = 0 THEN {x} "
        f"WHEN ascii({x}) BETWEEN 48 AND 57 THEN {x} "
        f"WHEN ascii({x}) > 128 AND {x} !~ '^[{NFKC_SPACE_OR_TRIGGER_CHARS}]' THEN {x} "
        f"WHEN {x} ~ '^ *{_SQL_PLAIN_NUMBER}' THEN {x} "
        f"WHEN octet_length({x}) = char_length({x}) "
        f"THEN CASE WHEN {x} ~ '^ *{_SQL_TRIGGER}' THEN {quoted} ELSE {x} END "
        f"WHEN ({x} ~ '^ *{_SQL_TRIGGER}' OR {normalized} ~ '^{_SQL_TRIGGER}') "
        f"AND {normalized} !~ '^{_SQL_PLAIN_NUMBER}' THEN {quoted} "
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

"""The export CSV format: columns, formula-injection neutralisation, and SQL/Python agreement."""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest

from jobs.exports.csv_format import (
    COMPANY_COLUMNS,
    CONTACT_COLUMNS,
    NFKC_SPACE_OR_TRIGGER_CHARS,
    format_tags,
    format_timestamp,
    neutralize,
    neutralize_sql,
    tags_sql,
    timestamp_sql,
)

# (cell as stored, cell as exported)
INJECTIONS = [
    ("=1+1", "'=1+1"),
    ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
    ("+SUM(A1:A2)", "'+SUM(A1:A2)"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"),
    ("\tplain", "'\tplain"),
    ("\r=1", "'\r=1"),
    ("\n=1", "'\n=1"),
    ("\uff1d1+1", "'\uff1d1+1"),  # full-width equals
    ("\uff20x", "'\uff20x"),  # full-width commercial at
    ("\ufe66cmd", "'\ufe66cmd"),  # small equals sign
    ("\u207ccmd", "'\u207ccmd"),  # superscript equals
    ("  =1+1", "'  =1+1"),
    ("   @x", "'   @x"),
    ("\u3000=1", "'\u3000=1"),  # ideographic space, NFKC: a space
    ("\u00a0+x", "'\u00a0+x"),  # no-break space
    ("=\u0338x", "'=\u0338x"),  # NFKC composes "=" + U+0338 into U+2260; raw still starts "="
    ("- item", "'- item"),
    ("+", "'+"),
    ("=", "'="),
    ("+1 555\n", "'+1 555\n"),  # a newline is not phone-like
    ("-1e3", "'-1e3"),
]
KEPT = [
    ("+1 (555) 010-0000", "+1 (555) 010-0000"),
    ("-12.5", "-12.5"),
    ("+44 20 7946 0958", "+44 20 7946 0958"),
    ("  +44 20 7946 0958", "  +44 20 7946 0958"),
    ("(555) 010-0000", "(555) 010-0000"),
    ("-", "-"),
    ("\uff0b1 555", "\uff0b1 555"),  # full-width plus: NFKC gives "+1 555", phone-like
    ("12.5", "12.5"),
    ("a=b", "a=b"),
    ("zoe@example.com", "zoe@example.com"),
    ("Émile", "Émile"),
    ("東京", "東京"),
    ("'=already quoted", "'=already quoted"),
    (" ", " "),
    ("", ""),
]


@pytest.mark.parametrize(("value", "expected"), INJECTIONS + KEPT)
def test_neutralize(value: str, expected: str) -> None:
    assert neutralize(value) == expected


def test_neutralize_none_is_an_empty_cell() -> None:
    assert neutralize(None) == ""


def test_columns_are_the_contract_order() -> None:
    assert CONTACT_COLUMNS == (
        "id", "email", "first_name", "last_name", "phone", "company", "job_title",
        "city", "country", "linkedin_url", "tags", "created_at", "updated_at",
    )  # fmt: skip
    assert COMPANY_COLUMNS == (
        "id", "name", "domain", "contacts_count", "created_at", "updated_at",
    )  # fmt: skip


def nfkc_starts_with(chars: str) -> str:
    """Every non-ASCII character whose NFKC form starts with one of `chars`, by Python."""
    found = []
    for code in range(0x80, 0x110000):
        normalized = unicodedata.normalize("NFKC", chr(code))
        if normalized[:1] and normalized[0] in chars:
            found.append(chr(code))
    return "".join(found)


COMPAT_TRIGGERS = (
    "\u207a\u207c\u208a\u208c\u2a75\u2a76\ufb29\ufe62\ufe63\ufe66\ufe6b\uff0b\uff0d\uff1d\uff20"
)


def test_compatibility_characters_tables_match_pythons_unicode_data() -> None:
    assert nfkc_starts_with("=+-@\t\r\n") == COMPAT_TRIGGERS
    assert nfkc_starts_with(" =+-@\t\r\n") == NFKC_SPACE_OR_TRIGGER_CHARS


async def test_compatibility_characters_table_matches_postgresqls_unicode_data(
    pg: asyncpg.Connection,
) -> None:
    """The SQL skips normalize() for any other first character: PostgreSQL must agree."""
    found = await pg.fetchval(
        "SELECT string_agg(chr(c), '' ORDER BY c) FROM generate_series(128, 1114111) AS c "
        "WHERE (c < 55296 OR c > 57343) "  # surrogates are not characters
        "AND left(normalize(chr(c), NFKC), 1) IN (' ', '=', '+', '-', '@', E'\\t', E'\\r', E'\\n')"
    )
    assert found == NFKC_SPACE_OR_TRIGGER_CHARS


def fuzz_values(count: int) -> list[str]:
    alphabet = list('=+-@\t\r\n ().0123456789aeZ:"É\u0338') + list(NFKC_SPACE_OR_TRIGGER_CHARS)
    rng = random.Random(20261126)
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(count)]


async def sql_results(
    pg: asyncpg.Connection, expression: str, values: Sequence[str | None]
) -> list[str | None]:
    rows = await pg.fetch(
        f"SELECT {expression} AS out FROM unnest($1::text[]) WITH ORDINALITY AS t(v, n) ORDER BY n",
        values,
    )
    return [row["out"] for row in rows]


@pytest.mark.parametrize("expression", ["pg_temp.csv_safe(v)", neutralize_sql("v")])
async def test_sql_agrees_with_python(pg: asyncpg.Connection, expression: str) -> None:
    values = [v for v, _ in INJECTIONS + KEPT]
    values += [c + "1" for c in NFKC_SPACE_OR_TRIGGER_CHARS]
    values += [c + "=x" for c in NFKC_SPACE_OR_TRIGGER_CHARS]
    values += fuzz_values(5000)
    expected = [neutralize(v) for v in values]
    assert await sql_results(pg, expression, values) == expected
    # NULL stays NULL, which COPY writes as the same empty cell as neutralize(None).
    assert await sql_results(pg, expression, [None]) == [None]


async def test_csv_safe_is_inlined_by_the_planner(pg: asyncpg.Connection) -> None:
    """Inlined, the function costs what the bare CASE costs; a call per cell would not."""
    plan = await pg.fetchval(
        "EXPLAIN (VERBOSE, FORMAT JSON) SELECT pg_temp.csv_safe(v) FROM unnest($1::text[]) v",
        ["a"],
    )
    output = json.loads(plan)[0]["Plan"]["Output"]  # asyncpg hands json over as text
    assert len(output) == 1
    assert output[0].startswith("CASE WHEN")
    assert "csv_safe" not in output[0]


async def test_tags_and_timestamps_match_their_python_twins(pg: asyncpg.Connection) -> None:
    moment = datetime(2026, 11, 26, 9, 5, 7, 654321, tzinfo=timezone(timedelta(hours=5)))
    row = await pg.fetchrow(
        f"SELECT {tags_sql('$1::text[]')} AS tags, {timestamp_sql('$2::timestamptz')} AS at",
        ["vip", "=x", "b2b"],
        moment,
    )
    assert row is not None
    assert row["tags"] == format_tags(["vip", "=x", "b2b"]) == "vip;=x;b2b"
    assert row["at"] == format_timestamp(moment) == "2026-11-26T04:05:07Z"
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert (format_tags(None), format_timestamp(None)) == ("", "")

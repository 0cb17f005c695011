"""What lands in the exported cells: formula injection neutralised, phones and numbers intact,
any Unicode round-tripped byte for byte."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.exports.csv_format import CONTACT_COLUMNS
from jobs.exports.job import generate_company_export, generate_contact_export
from tests.exports.factories import Rows, new_export, parse_csv, sorted_records
from worker.context import Ctx
from worker.storage import LocalStorage

PHONE = "+1 (555) 010-0000"

# (cell as stored, cell as exported): the cases of issue 4, each with a formula after it.
FORMULAS = [
    ("=1+1", "'=1+1"),
    ('=HYPERLINK("http://evil.test","x")', '\'=HYPERLINK("http://evil.test","x")'),
    ("+SUM(A1:A9)", "'+SUM(A1:A9)"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1+1", "'\t=1+1"),
    ("\r=1+1", "'\r=1+1"),
    ("\n=1+1", "'\n=1+1"),
    ("\uff1d1+1", "'\uff1d1+1"),  # full-width equals
    ("\uff0bcmd", "'\uff0bcmd"),  # full-width plus, not followed by a number
    ("   =1+1", "'   =1+1"),  # leading spaces
    ("\u3000@x", "'\u3000@x"),  # ideographic space: a space after NFKC
]
# Values that look dangerous at a glance but are plainly numbers or phones: kept as they are.
KEPT = [
    (PHONE, PHONE),
    ("+44 20 7946 0958", "+44 20 7946 0958"),
    ("-12.5", "-12.5"),
    ("42", "42"),
    ("+3", "+3"),
    ("  (555) 010-0000", "  (555) 010-0000"),
    ("\uff0b1 555 0100", "\uff0b1 555 0100"),  # full-width plus then digits: phone-like
    ("a=b", "a=b"),
    ("me@example.com", "me@example.com"),
]


async def _export_contacts(
    ctx: Ctx, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession], user: uuid.UUID
) -> tuple[bytes, list[dict[str, str]]]:
    export_id = await new_export(sessions, user)
    await generate_contact_export.run(ctx, export_id=str(export_id))
    data = (storage.root / str(user) / f"{export_id}.csv").read_bytes()
    header, *records = sorted_records(data)  # by email: exports have no row order
    assert tuple(header) == CONTACT_COLUMNS
    return data, [dict(zip(header, r, strict=True)) for r in records]


async def test_every_formula_case_is_neutralised_in_every_text_column(
    ctx: Ctx, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    cases = FORMULAS + KEPT
    for i, (value, _) in enumerate(cases):
        company = await rows.company(user, f"{value} #{i}" if i % 2 else value + f"{i}")
        await rows.contact(
            user,
            f"case{i:02d}@example.com",
            first_name=value,
            last_name=value,
            phone=PHONE,
            company_id=company,
            job_title=value,
            city=value,
            country=value,
            linkedin_url=value,
            tags=[value, "ok"],
        )
    _, records = await _export_contacts(ctx, storage, sessions, user)

    assert len(records) == len(cases)
    for record, (value, expected) in zip(records, cases, strict=True):
        got = {k: record[k] for k in ("first_name", "last_name", "job_title", "city", "country")}
        assert got == dict.fromkeys(got, expected), repr(value)
        assert record["linkedin_url"] == expected, repr(value)
        assert record["phone"] == PHONE


async def test_tags_and_company_cells_are_neutralised_as_a_whole(
    ctx: Ctx, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    evil = await rows.company(user, '=IMPORTXML(CONCAT(A1),"//a")')
    await rows.contact(user, "a@example.com", tags=["=cmd|'/c calc'!A0", "ok"], company_id=evil)
    await rows.contact(user, "b@example.com", tags=["-1", "x"])  # "-1;x" is not a number
    await rows.contact(user, "c@example.com", tags=["ok", "=later"])  # only the start counts
    await rows.contact(user, "d@example.com", tags=["+1 555", "-2"])  # "+1 555;-2": not a phone
    _, records = await _export_contacts(ctx, storage, sessions, user)
    assert [(r["email"], r["tags"], r["company"]) for r in records] == [
        ("a@example.com", "'=cmd|'/c calc'!A0;ok", '\'=IMPORTXML(CONCAT(A1),"//a")'),
        ("b@example.com", "'-1;x", ""),
        ("c@example.com", "ok;=later", ""),
        ("d@example.com", "'+1 555;-2", ""),
    ]


async def test_companies_export_neutralises_name_and_domain(
    ctx: Ctx, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    company = await rows.company(user, "@evil", domain="=1+1")
    await rows.contact(user, "a@example.com", company_id=company)
    export_id = await new_export(sessions, user, kind="companies")
    await generate_company_export.run(ctx, export_id=str(export_id))
    data = (storage.root / str(user) / f"{export_id}.csv").read_bytes()
    assert [r[:4] for r in parse_csv(data)] == [
        ["id", "name", "domain", "contacts_count"],
        [str(company), "'@evil", "'=1+1", "1"],
    ]


UNICODE = [
    "Zoë Ørsted-Ångström",
    "😀 family: 👨‍👩‍👧‍👦, flags 🇯🇵🇧🇷",
    "مرحبا بالعالم",  # Arabic, right to left
    "שלום עולם",  # Hebrew, right to left
    "\u200f\u05de\u05e1\u05e4\u05e8 12",  # right-to-left mark, then Hebrew "number 12"
    "東京都千代田区",
    "서울특별시",
    "e\u0301 (combining acute)",
    'line one\nline two, with "quotes"',
    # Fraktur letters and double-struck digits, outside the BMP
    "\U0001d518\U0001d52b\U0001d526\U0001d520\U0001d52c\U0001d521"
    "\U0001d522 \U0001d7d9\U0001d7da\U0001d7db",
]


async def test_unicode_round_trips_exactly(
    ctx: Ctx, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    for i, value in enumerate(UNICODE):
        company = await rows.company(user, f"{value} {i}")
        await rows.contact(
            user,
            f"u{i}@例え.jp",
            first_name=value,
            city=value,
            company_id=company,
            tags=[value, "標籤"],
        )
    data, records = await _export_contacts(ctx, storage, sessions, user)

    assert data.startswith(b"id,email,")  # UTF-8 without a byte order mark
    assert [(r["email"], r["first_name"], r["city"], r["company"], r["tags"]) for r in records] == [
        (f"u{i}@例え.jp", v, v, f"{v} {i}", f"{v};標籤") for i, v in enumerate(UNICODE)
    ]

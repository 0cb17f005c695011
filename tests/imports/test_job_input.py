"""Bad and unusual input, end to end: file -> job -> PostgreSQL rows, counts and row errors."""

from __future__ import annotations

import codecs
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.imports.error_payload import MORE_FIELDS_KEY
from tests.imports.conftest import (
    contact,
    contacts,
    counts,
    import_bytes,
    run_job,
    start_import,
)
from worker.client import JobsClient
from worker.context import Ctx
from worker.errors import PermanentError

Sessions = async_sessionmaker[AsyncSession]


async def test_utf8_bom_and_crlf(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = codecs.BOM_UTF8 + b"Email,First Name\r\nann@x.io,Ann\r\nbob@x.io,Bob\r\n"
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 2, 2, 2, 0, 0)
    assert status.message is None and status.percent == 100.0
    assert await contacts(sessions, user_id) == [
        contact("ann@x.io", first_name="Ann"),
        contact("bob@x.io", first_name="Bob"),
    ]


async def test_windows_1252_with_semicolons(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = "email;last name;city\r\nz@x.io;Müller;Besançon\r\n".encode("cp1252")
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 1, 1, 1, 0, 0)
    assert await contacts(sessions, user_id) == [
        contact("z@x.io", last_name="Müller", city="Besançon")
    ]


async def test_utf16_tab_separated(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = "email\tcity\tcountry\r\na@x.io\tKraków\tPolska\r\nb@x.io\t東京\tJapan\r\n".encode(
        "utf-16"
    )
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 2, 2, 2, 0, 0)
    assert await contacts(sessions, user_id) == [
        contact("a@x.io", city="Kraków", country="Polska"),
        contact("b@x.io", city="東京", country="Japan"),
    ]


async def test_quoted_newlines_delimiters_and_quotes(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = (
        "email,first_name,job_title\n"
        'a@x.io,"Ann ""the boss""","Head of\nSales, EMEA"\n'
        "not-an-email,x,y\n"
    )
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 2, 2, 1, 0, 1)
    assert await contacts(sessions, user_id) == [
        contact("a@x.io", first_name='Ann "the boss"', job_title="Head of\nSales, EMEA")
    ]
    # The quoted newline does not start a row: the bad row is record 3.
    errors = await jobs_client.import_errors(status.id)
    assert [(e.row_number, e.message) for e in errors] == [(3, "email: not a valid email address")]


async def test_header_only_completes_with_zero_rows(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    status = await import_bytes(ctx, jobs_client, user_id, "email,first_name\r\n")
    assert counts(status) == ("completed", 0, 0, 0, 0, 0)
    assert status.finished_at is not None and await contacts(sessions, user_id) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the file is empty"),
        (
            b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
            "the file is not a CSV text file (it looks binary: it starts like a PNG image)",
        ),
        (
            b"name,phone,Company\nAnn,123,Acme\n",
            'the file has no email column (a header such as "email" or "E-mail"); '
            "the headers found are: name, phone, Company",
        ),
    ],
    ids=["empty", "png-renamed-csv", "no-email-column"],
)
async def test_unreadable_files_fail_at_once_with_a_message(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, data: bytes, message: str
) -> None:
    import_id = await start_import(jobs_client, user_id, data)
    with pytest.raises(PermanentError, match="^" + message[:20]):
        await run_job(ctx, import_id)  # PermanentError: arq records it, no retry
    status = await jobs_client.import_status(import_id)
    assert counts(status) == ("failed", None, 0, 0, 0, 0)
    assert status.message == message and status.finished_at is not None


async def test_invalid_emails_become_row_errors(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    long_domain = ".".join(["d" * 60] * 5) + ".io"  # 310 characters
    data = "\n".join(
        [
            "email,first_name",
            "ok@x.io,Ok",
            "no-at-sign.example.com,A",
            "two@@x.io,B",
            "has space@x.io,C",
            ",D",
            f"{'l' * 65}@x.io,E",
            "ünï@x.io,F",
            f"a@{long_domain},G",
            "trailing.dot@x.io.,H",
        ]
    )
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 9, 9, 1, 0, 8)
    invalid = "email: not a valid email address"
    errors = await jobs_client.import_errors(status.id)
    assert [(e.row_number, e.message) for e in errors] == [
        (3, invalid),
        (4, invalid),
        (5, invalid),
        (6, "email: missing"),
        (7, f"{invalid} (more than 64 characters before the @)"),
        (8, invalid),
        (9, f"{invalid} (longer than 254 characters)"),
        (10, invalid),
    ]
    assert errors[0].payload == {"email": "no-at-sign.example.com", "first_name": "A"}
    assert await contacts(sessions, user_id) == [contact("ok@x.io", first_name="Ok")]


async def test_same_email_twice_in_a_batch_with_case_and_spaces(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = "email,first_name,city,phone\nAnn@X.io,Ann,,1\n  ANN@x.IO ,,Paris,2\n"
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 2, 2, 1, 1, 0)
    assert await contacts(sessions, user_id) == [
        contact("ann@x.io", first_name="Ann", city="Paris", phone="2")
    ]


async def test_ragged_rows(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = (
        "email,first_name,last_name\nshort@x.io,Ann\nlong-empty@x.io,Bob,B,,\nlong@x.io,C,D,extra\n"
    )
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 3, 3, 2, 0, 1)
    assert await contacts(sessions, user_id) == [
        contact("long-empty@x.io", first_name="Bob", last_name="B"),
        contact("short@x.io", first_name="Ann"),
    ]
    errors = await jobs_client.import_errors(status.id)
    assert [(e.row_number, e.message) for e in errors] == [
        (4, "row has 4 fields, the header has 3")
    ]
    assert errors[0].payload == {
        "email": "long@x.io",
        "first_name": "C",
        "last_name": "D",
        MORE_FIELDS_KEY: "1 more field",
    }


async def test_a_200_kb_field_is_a_row_error(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = f"email,notes\nbig@x.io,{'x' * 200_000}\nok@x.io,fine\n"
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 2, 2, 1, 0, 1)
    assert status.message == "ignored columns: notes"
    (error,) = await jobs_client.import_errors(status.id)
    assert (error.row_number, error.message) == (2, "notes: longer than 65536 characters")
    assert error.payload["notes"] == "x" * 1024 + "\u2026 (200000 characters)"
    assert [c["email"] for c in await contacts(sessions, user_id)] == ["ok@x.io"]


async def test_nul_bytes_are_a_row_error(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    rows = "".join(f"fine{i}@x.io,Name {i}\n" for i in range(20))
    data = f"email,first_name\nnul@x.io,An\x00n\n{rows}"
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 21, 21, 20, 0, 1)
    (error,) = await jobs_client.import_errors(status.id)
    assert (error.row_number, error.message) == (2, "first_name: contains a NUL byte")
    assert error.payload == {"email": "nul@x.io", "first_name": "An\u2400n"}


async def test_formula_like_values_are_stored_as_given(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = (
        "email,first_name,last_name,phone,job_title,city\n"
        'f@x.io,"=HYPERLINK(""http://evil"",""x"")",+SUM(1),+49 30 1234,@cmd,-2+3\n'
    )
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 1, 1, 1, 0, 0)
    assert await contacts(sessions, user_id) == [
        contact(
            "f@x.io",
            first_name='=HYPERLINK("http://evil","x")',
            last_name="+SUM(1)",
            phone="+49 30 1234",
            job_title="@cmd",
            city="-2+3",
        )
    ]


async def test_emoji_rtl_and_cjk_text(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = "email,first_name,last_name,company,city\nu@x.io,😀 Zoë,שָׁלוֹם,مرحبا للتجارة,東京都\n"
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 1, 1, 1, 0, 0)
    assert await contacts(sessions, user_id) == [
        contact(
            "u@x.io", first_name="😀 Zoë", last_name="שָׁלוֹם", company="مرحبا للتجارة", city="東京都"
        )
    ]


async def test_alias_headers_and_ignored_columns(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = (
        "E-mail,Given name,Surname,Mobile,Organization,Title,Town,Country,LinkedIn URL,Labels,"
        "Favourite colour,Notes,Phone Number\n"
        "A@X.io,Ann,Lee,+1 555,Acme,CTO,Oslo,Norway,https://linkedin.com/in/ann,vip; lead,"
        "red,hi,999\n"
    )
    status = await import_bytes(ctx, jobs_client, user_id, data)
    assert counts(status) == ("completed", 1, 1, 1, 0, 0)
    assert status.message == (
        "ignored columns: Favourite colour, Notes; ignored repeated columns: Phone Number "
        "(an earlier column has the same meaning)"
    )
    assert await contacts(sessions, user_id) == [
        {
            "email": "a@x.io",
            "first_name": "Ann",
            "last_name": "Lee",
            "phone": "+1 555",
            "company": "Acme",
            "job_title": "CTO",
            "city": "Oslo",
            "country": "Norway",
            "linkedin_url": "https://linkedin.com/in/ann",
            "tags": ["vip", "lead"],
        }
    ]

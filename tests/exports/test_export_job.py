"""The export jobs on local storage: content, ownership, selections, format, idempotency."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import Contact, Export
from jobs.exports.job import ExportResult, generate_company_export, generate_contact_export
from tests.exports.factories import (
    COMPANY_HEADER,
    CONTACT_HEADER,
    UPDATED_ISO,
    Rows,
    export_row,
    iso,
    new_export,
    same_rows,
    sorted_records,
)
from tests.support.result_shapes import assert_shape
from worker.context import Ctx
from worker.errors import PermanentError
from worker.storage import LocalStorage


@pytest.fixture
def rows(sessions: async_sessionmaker[AsyncSession]) -> Rows:
    return Rows(sessions)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_empty_export_is_the_header_only(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    other = await rows.user()
    await rows.contact(other, "not-mine@example.com")
    export_id = await new_export(sessions, user)

    result = await generate_contact_export.run(ctx, export_id=str(export_id))
    assert_shape(result, ExportResult)

    path = storage.root / str(user) / f"{export_id}.csv"
    assert path.read_bytes() == CONTACT_HEADER.encode()
    assert result == {
        "export_id": str(export_id),
        "kind": "contacts",
        "status": "completed",
        "row_count": 0,
        "file_path": str(path),
        "message": None,
        "written": True,
    }
    row = await export_row(sessions, export_id)
    assert (row.status, row.row_count, row.file_path, row.error, row.message) == (
        "completed",
        0,
        str(path),
        None,
        None,
    )
    assert row.started_at is not None and row.finished_at is not None
    assert row.started_at <= row.finished_at
    assert files_under(storage.root) == [f"{user}/{export_id}.csv"]


async def test_all_contacts_with_company_name_tags_and_utc_timestamps(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    acme = await rows.company(user, "Acme, Inc.", domain="acme.test")  # n=0
    a = await rows.contact(  # n=1
        user,
        "ada@acme.test",
        first_name="Ada",
        last_name="Lovelace",
        phone="+1 (555) 010-0000",
        company_id=acme,
        job_title="Engineer",
        city="London",
        country="GB",
        linkedin_url="https://www.linkedin.com/in/ada",
        tags=["vip", "lead", "2026"],
    )
    b = await rows.contact(user, "bob@example.com", tags=[])  # n=2: everything else NULL
    c = await rows.contact(user, "cy@example.com", first_name='Cy "the" Guy', tags=["x"])
    export_id = await new_export(sessions, user)

    result = await generate_contact_export.run(ctx, export_id=str(export_id))

    data = (storage.root / str(user) / f"{export_id}.csv").read_text(encoding="utf-8")
    assert same_rows(data) == same_rows(
        CONTACT_HEADER
        + f'{a},ada@acme.test,Ada,Lovelace,+1 (555) 010-0000,"Acme, Inc.",Engineer,London,GB,'
        f"https://www.linkedin.com/in/ada,vip;lead;2026,{iso(1)},{UPDATED_ISO}\n"
        f"{b},bob@example.com,,,,,,,,,,{iso(2)},{UPDATED_ISO}\n"
        f'{c},cy@example.com,"Cy ""the"" Guy",,,,,,,,x,{iso(3)},{UPDATED_ISO}\n'
    )
    assert result["row_count"] == 3


async def test_selection_skips_other_users_and_unknown_ids_and_counts_them(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    other = await rows.user()
    mine = [await rows.contact(user, f"m{i}@example.com") for i in range(3)]
    theirs = [await rows.contact(other, f"secret{i}@other.test") for i in range(2)]
    unknown = uuid.uuid4()
    export_id = await new_export(sessions, user, ids=[mine[0], mine[2], *theirs, unknown])

    result = await generate_contact_export.run(ctx, export_id=str(export_id))

    data = (storage.root / str(user) / f"{export_id}.csv").read_bytes()
    assert [r[:2] for r in sorted_records(data)] == [
        ["id", "email"],
        [str(mine[0]), "m0@example.com"],
        [str(mine[2]), "m2@example.com"],
    ]
    assert b"secret" not in data and b"other.test" not in data
    message = "3 requested ids were not found or belong to another user and were skipped"
    assert (result["row_count"], result["message"]) == (2, message)
    row = await export_row(sessions, export_id)
    assert (row.status, row.row_count, row.message) == ("completed", 2, message)


async def test_one_skipped_id_reads_in_the_singular(
    ctx: Ctx, rows: Rows, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    mine = await rows.contact(user, "m@example.com")
    export_id = await new_export(sessions, user, ids=[mine, uuid.uuid4()])
    result = await generate_contact_export.run(ctx, export_id=str(export_id))
    assert (result["row_count"], result["message"]) == (
        1,
        "1 requested id was not found or belongs to another user and was skipped",
    )


async def test_empty_selection_is_the_header_only(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    await rows.contact(user, "m@example.com")
    export_id = await new_export(sessions, user, ids=[])  # picked nothing: not "everything"
    result = await generate_contact_export.run(ctx, export_id=str(export_id))
    assert (storage.root / str(user) / f"{export_id}.csv").read_text() == CONTACT_HEADER
    assert (result["row_count"], result["message"]) == (0, None)


async def test_companies_with_contacts_count_of_their_owner_only(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    other = await rows.user()
    acme = await rows.company(user, "Acme", domain="acme.test")  # n=0
    empty = await rows.company(user, "=Empty Co")  # n=1
    globex = await rows.company(user, "Globex", domain="globex.test")  # n=2
    await rows.company(other, "Theirs Ltd")
    for i in range(2):
        await rows.contact(user, f"a{i}@acme.test", company_id=acme)
    await rows.contact(user, "g@globex.test", company_id=globex)
    await rows.contact(user, "free@example.com")
    # A foreign contact pointing at our company (possible in SQL): not ours to count.
    await rows.contact(other, "spy@other.test", company_id=acme)
    export_id = await new_export(sessions, user, kind="companies")

    result = await generate_company_export.run(ctx, export_id=str(export_id))

    data = (storage.root / str(user) / f"{export_id}.csv").read_text()
    assert same_rows(data) == same_rows(
        COMPANY_HEADER
        + f"{acme},Acme,acme.test,2,{iso(0)},{UPDATED_ISO}\n"
        + f"{empty},'=Empty Co,,0,{iso(1)},{UPDATED_ISO}\n"
        + f"{globex},Globex,globex.test,1,{iso(2)},{UPDATED_ISO}\n"
    )
    assert (result["kind"], result["row_count"]) == ("companies", 3)


async def test_company_selection_with_a_foreign_company(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    other = await rows.user()
    acme = await rows.company(user, "Acme")
    await rows.company(user, "Globex")
    theirs = await rows.company(other, "Theirs Ltd")
    export_id = await new_export(sessions, user, kind="companies", ids=[acme, theirs])
    result = await generate_company_export.run(ctx, export_id=str(export_id))
    data = (storage.root / str(user) / f"{export_id}.csv").read_text()
    assert data == COMPANY_HEADER + f"{acme},Acme,,0,{iso(0)},{UPDATED_ISO}\n"
    assert result["message"] == (
        "1 requested id was not found or belongs to another user and was skipped"
    )


async def test_a_completed_export_run_again_does_nothing(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    contact = await rows.contact(user, "first@example.com")
    export_id = await new_export(sessions, user)
    first = await generate_contact_export.run(ctx, export_id=str(export_id))
    path = storage.root / str(user) / f"{export_id}.csv"
    before = path.read_bytes()
    stat_before = path.stat()
    row_before = await export_row(sessions, export_id)
    async with sessions.begin() as session:  # the data changes after the export completed
        await session.execute(
            update(Contact).where(Contact.id == contact).values(email="changed@example.com")
        )

    second = await generate_contact_export.run(ctx, export_id=str(export_id))
    assert_shape(second, ExportResult)

    assert second == {**first, "written": False}
    assert path.read_bytes() == before
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (
        stat_before.st_ino,
        stat_before.st_mtime_ns,
    )
    row_after = await export_row(sessions, export_id)
    assert (row_after.finished_at, row_after.started_at) == (
        row_before.finished_at,
        row_before.started_at,
    )


async def test_a_failed_export_delivered_again_is_rewritten_whole(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    contact = await rows.contact(user, "a@example.com")
    export_id = await new_export(sessions, user)
    path = storage.root / str(user) / f"{export_id}.csv"
    path.parent.mkdir(parents=True)
    path.write_text("stale partial content from nowhere")
    async with sessions.begin() as session:
        await session.execute(
            update(Export)
            .where(Export.id == export_id)
            .values(status="failed", error="S3 upload_part failed: InternalError")
        )
    result = await generate_contact_export.run(ctx, export_id=str(export_id))
    assert path.read_text() == CONTACT_HEADER + (
        f"{contact},a@example.com,,,,,,,,,,{iso(0)},{UPDATED_ISO}\n"
    )
    row = await export_row(sessions, export_id)
    assert (row.status, row.error, result["row_count"]) == ("completed", None, 1)


async def test_missing_export_fails_permanently_and_writes_nothing(
    ctx: Ctx, storage: LocalStorage
) -> None:
    missing = uuid.uuid4()
    with pytest.raises(PermanentError) as caught:
        await generate_contact_export.run(ctx, export_id=str(missing))
    assert str(caught.value) == f"export {missing} does not exist (deleted before it ran?)"
    assert files_under(storage.root) == []


async def test_bad_export_id_fails_permanently(ctx: Ctx) -> None:
    with pytest.raises(PermanentError) as caught:
        await generate_contact_export.run(ctx, export_id="../../etc/passwd")
    assert str(caught.value) == "export_id '../../etc/passwd' is not a UUID"


async def test_wrong_job_for_the_kind_marks_the_export_failed(
    ctx: Ctx, rows: Rows, storage: LocalStorage, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await rows.user()
    export_id = await new_export(sessions, user, kind="companies")
    with pytest.raises(PermanentError):
        await generate_contact_export.run(ctx, export_id=str(export_id))
    row = await export_row(sessions, export_id)
    assert (row.status, row.error) == (
        "failed",
        f"export {export_id} is a companies export, but this job writes contacts exports",
    )
    assert row.finished_at is not None
    assert files_under(storage.root) == []

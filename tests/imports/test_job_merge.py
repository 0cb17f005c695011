"""Merge semantics: rows apply in file order, empty cells keep data, batches change nothing."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.imports.conftest import (
    companies,
    contact,
    contacts,
    counts,
    import_bytes,
)
from tests.support.users import new_user
from worker.client import JobsClient
from worker.context import Ctx

Sessions = async_sessionmaker[AsyncSession]

# Duplicates near and far apart, case and spaces, empty cells, company spellings, bad rows.
TRICKY = (
    "email,first_name,last_name,company,city,tags\n"
    "a@x.io,Ann,,Acme Corp,,vip\n"  # 2
    "b@x.io,Bob,Brown,,Oslo,\n"  # 3
    "bad-row,x,y,Evil Corp,z,\n"  # 4: invalid, its company never created
    " A@X.IO ,,Lee,,Paris,\n"  # 5: a@ again: keeps Ann, adds Lee and Paris
    "c@x.io,,,ACME CORP,,\n"  # 6: same company, other spelling
    "b@x.io,Robert,,globex,,lead;new\n"  # 7: b@ again
    ",nobody,,,,\n"  # 8: missing email
    "a@x.io,Anna,,Globex,,\n"  # 9: a@ a third time: moves to Globex
    "d@x.io,Dan,,acme corp,Rome,\n"  # 10
    "b@x.io,,,,,\n"  # 11: b@ with nothing: changes nothing, still an update
)
TRICKY_CONTACTS = [
    # "globex" (row 7) is the company's first spelling; row 9's "Globex" links to it.
    contact(
        "a@x.io", first_name="Anna", last_name="Lee", company="globex", city="Paris", tags=["vip"]
    ),
    contact(
        "b@x.io",
        first_name="Robert",
        last_name="Brown",
        company="globex",
        city="Oslo",
        tags=["lead", "new"],
    ),
    contact("c@x.io", company="Acme Corp"),
    contact("d@x.io", first_name="Dan", company="Acme Corp", city="Rome"),
]


def _with_batch_rows(ctx: Ctx, batch_rows: int, **more: int) -> Ctx:
    settings = ctx["settings"].model_copy(update={"import_batch_rows": batch_rows, **more})
    return {**ctx, "settings": settings}


@pytest.mark.parametrize("batch_rows", [1000, 1, 2, 3])
async def test_outcome_does_not_depend_on_batch_boundaries(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions, batch_rows: int
) -> None:
    user = await new_user(sessions)
    status = await import_bytes(_with_batch_rows(ctx, batch_rows), jobs_client, user, TRICKY)
    # 10 data rows: 2 invalid, 4 contacts created, 4 rows hit a contact created earlier.
    assert counts(status) == ("completed", 10, 10, 4, 4, 2)
    assert await contacts(sessions, user) == TRICKY_CONTACTS
    assert await companies(sessions, user) == ["Acme Corp", "globex"]
    errors = await jobs_client.import_errors(status.id)
    assert [(e.row_number, e.message) for e in errors] == [
        (4, "email: not a valid email address"),
        (8, "email: missing"),
    ]


async def test_an_update_never_erases_stored_values(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    first = "email,first_name,phone,company,tags\nkim@x.io,Kim,+1 555,Acme,vip\n"
    await import_bytes(ctx, jobs_client, user_id, first)
    second = "email,first_name,phone,company,tags,city\nKIM@x.io,,,,,Lima\nnew@x.io,,,,,\n"
    status = await import_bytes(ctx, jobs_client, user_id, second)
    assert counts(status) == ("completed", 2, 2, 1, 1, 0)
    assert await contacts(sessions, user_id) == [
        contact(
            "kim@x.io", first_name="Kim", phone="+1 555", company="Acme", tags=["vip"], city="Lima"
        ),
        contact("new@x.io"),
    ]


async def test_contacts_made_outside_the_import_are_updated_and_counted(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO contacts (user_id, email, last_name) VALUES (:u, 'Old@X.io', 'Old')"),
            {"u": user_id},
        )
    status = await import_bytes(ctx, jobs_client, user_id, "email,first_name\nold@x.io,Ola\n")
    assert counts(status) == ("completed", 1, 1, 0, 1, 0)
    # The stored spelling of the email stays; the row fills in what it has.
    assert await contacts(sessions, user_id) == [
        contact("Old@X.io", first_name="Ola", last_name="Old")
    ]


async def test_reimporting_the_same_file_updates_every_valid_row(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    await import_bytes(ctx, jobs_client, user_id, TRICKY)
    status = await import_bytes(ctx, jobs_client, user_id, TRICKY)
    assert counts(status) == ("completed", 10, 10, 0, 8, 2)
    assert await contacts(sessions, user_id) == TRICKY_CONTACTS


async def test_two_spellings_of_one_company_are_one_company(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    data = "email,company\na@x.io,Acme Corp\nb@x.io,ACME CORP\nc@x.io,acme corp\nd@x.io,Ácme\n"
    status = await import_bytes(_with_batch_rows(ctx, 2), jobs_client, user_id, data)
    assert counts(status) == ("completed", 4, 4, 4, 0, 0)
    assert await companies(sessions, user_id) == ["Acme Corp", "Ácme"]
    assert [c["company"] for c in await contacts(sessions, user_id)] == [
        "Acme Corp",
        "Acme Corp",
        "Acme Corp",
        "Ácme",
    ]


async def test_more_invalid_rows_than_the_error_cap(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    rows = "".join(f"bad{i},x\n" if i % 3 else f"ok{i}@x.io,y\n" for i in range(30))
    capped = _with_batch_rows(ctx, 4, import_max_stored_errors=7)
    status = await import_bytes(capped, jobs_client, user_id, "email,first_name\n" + rows)
    assert counts(status) == ("completed", 30, 30, 10, 0, 20)
    errors = await jobs_client.import_errors(status.id, limit=100)
    # The first 7 invalid rows (data row i is record i + 2), whatever the batch size.
    assert [e.row_number for e in errors] == [3, 4, 6, 7, 9, 10, 12]
    assert len(await contacts(sessions, user_id)) == 10

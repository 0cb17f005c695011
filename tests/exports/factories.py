"""Rows for export tests (users, companies, contacts with fixed timestamps) and what export
tests check: files left under a root, S3 uploads left open, a job's tries."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.jobs import Job
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import Company, Contact, Export, ExportItem
from tests.support.users import new_user
from worker.serialization import deserialize

#: created_at of the first row each helper inserts; later rows are a second apart, so the
#: export's order (created_at, id) is the insertion order.
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
T0_ISO = "2026-03-01T12:00:00Z"
UPDATED = datetime(2026, 3, 2, 8, 30, 15, 999999, tzinfo=UTC)
UPDATED_ISO = "2026-03-02T08:30:15Z"

CONTACT_HEADER = (
    "id,email,first_name,last_name,phone,company,job_title,city,country,linkedin_url,tags,"
    "created_at,updated_at\n"
)
COMPANY_HEADER = "id,name,domain,contacts_count,created_at,updated_at\n"


def iso(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


class Rows:
    """Inserts rows; `n` counts them so every row gets a distinct, ordered created_at."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.n = 0

    def _stamp(self) -> dict[str, datetime]:
        stamp = {"created_at": T0 + timedelta(seconds=self.n), "updated_at": UPDATED}
        self.n += 1
        return stamp

    async def user(self, email: str | None = None) -> uuid.UUID:
        return await new_user(self.sessions, email)

    async def company(self, user_id: uuid.UUID, name: str, **fields: Any) -> uuid.UUID:
        values = {"user_id": user_id, "name": name, **self._stamp(), **fields}
        async with self.sessions.begin() as session:
            new_id = await session.scalar(insert(Company).values(values).returning(Company.id))
        assert new_id is not None
        return new_id

    async def contact(self, user_id: uuid.UUID, email: str, **fields: Any) -> uuid.UUID:
        values = {"user_id": user_id, "email": email, **self._stamp(), **fields}
        async with self.sessions.begin() as session:
            new_id = await session.scalar(insert(Contact).values(values).returning(Contact.id))
        assert new_id is not None
        return new_id

    async def many_contacts(self, user_id: uuid.UUID, count: int, prefix: str = "c") -> None:
        """`count` contacts in one statement, a second apart from `n` on."""
        rows = [
            {
                "user_id": user_id,
                "email": f"{prefix}{i:06d}@example.com",
                "first_name": f"First{i}",
                "last_name": f"Last {i}, Jr.",  # a comma: quoted cells in every row
                "phone": f"+1 (555) 010-{i % 10000:04d}",
                "city": "Zürich",
                "tags": ["vip", f"t{i % 7}"],
                **self._stamp(),
            }
            for i in range(count)
        ]
        async with self.sessions.begin() as session:
            await session.execute(insert(Contact), rows)


async def user_with_contacts(sessions: async_sessionmaker[AsyncSession], count: int) -> uuid.UUID:
    """A new user with `count` contacts (`Rows.many_contacts`)."""
    rows = Rows(sessions)
    user = await rows.user()
    await rows.many_contacts(user, count)
    return user


async def export_row(sessions: async_sessionmaker[AsyncSession], export_id: uuid.UUID) -> Export:
    async with sessions() as session:
        row = await session.scalar(select(Export).where(Export.id == export_id))
    assert row is not None
    return row


async def new_export(
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    kind: str = "contacts",
    ids: list[uuid.UUID] | None = None,
) -> uuid.UUID:
    """An export row as `JobsClient` creates it (selection in export_items), not enqueued."""
    async with sessions.begin() as session:
        export_id = await session.scalar(
            insert(Export)
            .values(user_id=user_id, kind=kind, has_selection=ids is not None)
            .returning(Export.id)
        )
        assert export_id is not None
        if ids:
            await session.execute(
                insert(ExportItem),
                [{"export_id": export_id, "item_id": i} for i in set(ids)],
            )
    return export_id


def parse_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


def same_rows(text: str) -> tuple[str, list[str]]:
    """The header line and the sorted data lines, byte for byte: exports have no row order.

    Only for files whose cells hold no newline (one record per line).
    """
    header, *lines = text.splitlines(keepends=True)
    return header, sorted(lines)


def sorted_records(data: bytes, column: str = "email") -> list[list[str]]:
    """The parsed header, then the records sorted by `column`."""
    header, *records = parse_csv(data)
    index = header.index(column)
    return [header, *sorted(records, key=lambda record: record[index])]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_no_upload_left(s3: Any, bucket: str) -> None:
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def job_tries(arq_redis: ArqRedis, export_id: uuid.UUID) -> tuple[int, bool]:
    """The export job's (try, success) from its arq result."""
    info = await Job(f"export:{export_id}", arq_redis, _deserializer=deserialize).result_info()
    assert info is not None
    return info.job_try, info.success

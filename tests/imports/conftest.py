"""Fixtures for the import job tests: a worker ctx, files in the users' import directories
(`IMPORT_DIR/<user_id>/`), contacts as rows."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.imports import process_contacts_import
from jobs.imports.job import ImportResult
from tests.support.ctx import CtxOpener
from worker.client import ImportStatus, JobsClient
from worker.context import Ctx
from worker.import_source import user_import_dir
from worker.settings import Settings

CONTACT_COLUMNS = (
    "email, first_name, last_name, phone, co.name AS company, job_title, city, country, "
    "linkedin_url, tags"
)


@pytest.fixture
async def ctx(open_ctx: CtxOpener) -> Ctx:
    """What `lifecycle.startup` gives an imports worker, to call the job directly."""
    return await open_ctx("imports")


@pytest.fixture
async def s3_ctx(open_ctx: CtxOpener, s3_settings: Settings) -> Ctx:
    """An imports worker's ctx whose sources may be on the rig's S3 (small batches)."""
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"  # moto's dummies, never real ones
    settings = s3_settings.model_copy(update={"import_batch_rows": 2})
    return await open_ctx("imports", settings=settings)


def user_dir(settings: Settings, user_id: uuid.UUID) -> Path:
    """The user's import directory, `IMPORT_DIR/<user_id>/`, created if need be."""
    home = user_import_dir(settings, user_id)
    home.mkdir(exist_ok=True)
    return home


def write_file(
    settings: Settings, user_id: uuid.UUID, data: bytes | str, name: str | None = None
) -> str:
    """Write `data` into the user's import directory (str as UTF-8); returns its path."""
    name = name or f"{uuid.uuid4().hex[:8]}.csv"
    raw = data.encode() if isinstance(data, str) else data
    path = user_dir(settings, user_id) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return str(path)


async def start_import(
    jobs_client: JobsClient, user_id: uuid.UUID, data: bytes | str, name: str | None = None
) -> uuid.UUID:
    status = await jobs_client.import_contacts(
        user_id, write_file(jobs_client.settings, user_id, data, name)
    )
    return status.id


async def run_job(ctx: Ctx, import_id: uuid.UUID) -> ImportResult:
    """The job as arq runs it: through the wrapper (limits, retry policy, failure record)."""
    return await process_contacts_import.run(ctx, job_id=str(import_id))


async def import_bytes(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, data: bytes | str
) -> ImportStatus:
    """Create an import of `data`, run the job once, return the final status."""
    import_id = await start_import(jobs_client, user_id, data)
    await run_job(ctx, import_id)
    return await jobs_client.import_status(import_id)


def counts(status: ImportStatus) -> tuple[Any, ...]:
    """(status, total, processed, created, updated, errors): the numbers a user sees."""
    return (
        status.status,
        status.total_rows,
        status.processed_rows,
        status.created_count,
        status.updated_count,
        status.error_count,
    )


async def contacts(
    sessions: async_sessionmaker[AsyncSession], user_id: uuid.UUID
) -> list[dict[str, Any]]:
    """The user's contacts by email, with the company's name instead of its id."""
    async with sessions() as session:
        rows = await session.execute(
            text(
                f"SELECT {CONTACT_COLUMNS} FROM contacts c "
                "LEFT JOIN companies co ON co.id = c.company_id "
                "WHERE c.user_id = :u ORDER BY email"
            ),
            {"u": user_id},
        )
        return [dict(row._mapping) for row in rows]


async def companies(sessions: async_sessionmaker[AsyncSession], user_id: uuid.UUID) -> list[str]:
    async with sessions() as session:
        rows = await session.scalars(
            text("SELECT name FROM companies WHERE user_id = :u ORDER BY lower(name)"),
            {"u": user_id},
        )
        return list(rows)


def contact(email: str, **values: Any) -> dict[str, Any]:
    """An expected contact row: every column None unless given."""
    row: dict[str, Any] = dict.fromkeys(
        ("first_name", "last_name", "phone", "company", "job_title", "city", "country"), None
    )
    row.update(linkedin_url=None, tags=None)
    return {"email": email, **row, **values}


@pytest.fixture(autouse=True)
def _import_dir_clean(settings: Settings) -> Iterator[None]:
    yield
    for path in Path(settings.import_dir).iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

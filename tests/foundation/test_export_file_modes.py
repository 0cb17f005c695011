"""Local exports are owner-only (L8): file 0600, created directories 0700, whatever the umask."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from worker.client import JobsClient
from worker.settings import Settings


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    # The worst an operator's shell or a container's init can leave: nothing masked.
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_an_export_under_umask_000_is_readable_by_its_owner_only(
    settings: Settings,
    jobs_client: JobsClient,
    run_burst: RunBurst,
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    tmp_path: Path,
    permissive_umask: None,
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO contacts (user_id, email) VALUES (:u, 'ada@example.com')"),
            {"u": user_id},
        )
    # EXPORT_DIR does not exist yet: the storage creates it and the user's directory.
    export_dir = tmp_path / "srv" / "exports"
    worker_settings = settings.model_copy(update={"export_dir": export_dir})
    export = await jobs_client.export_contacts(user_id)
    await run_burst("exports", settings_=worker_settings)

    status = await jobs_client.export_status(export.id)
    assert status.status == "completed" and status.row_count == 1
    exported = export_dir.resolve() / str(user_id) / f"{export.id}.csv"
    assert status.file_path == str(exported)
    assert "ada@example.com" in exported.read_text()
    assert oct(mode(exported)) == oct(0o600)
    for directory in (export_dir, export_dir / str(user_id)):
        assert oct(mode(directory)) == oct(0o700), directory
    # Nothing else (no leftover temporary file) sits next to it.
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]

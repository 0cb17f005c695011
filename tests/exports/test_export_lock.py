"""The one-writer lock: a second runner of the same export retries without writing, and a
late failure record never overwrites a completed export."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from arq.worker import Retry
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.exports.job import ExportBusy, generate_contact_export, mark_failed
from tests.exports.factories import (
    Rows,
    export_row,
    files_under,
    new_export,
)
from tests.support.ctx import CtxOpener
from worker.errors import PermanentError
from worker.settings import Settings
from worker.storage import LocalStorage


async def test_second_runner_finds_the_lock_taken_and_retries_without_writing(
    settings: Settings,
    open_ctx: CtxOpener,
    sessions: async_sessionmaker[AsyncSession],
    tmp_path: Path,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.contact(user, "a@example.com")
    export_id = await new_export(sessions, user)
    storage = LocalStorage(tmp_path / "exports")
    ctx = await open_ctx("exports", storage=storage)
    holder = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        # What a first runner holds for the length of its export.
        await holder.execute(
            "SELECT pg_advisory_lock(hashtextextended('export:' || $1::text, 0))", str(export_id)
        )
        with pytest.raises(Retry) as caught:
            await generate_contact_export.run(ctx, export_id=str(export_id))
        assert isinstance(caught.value.__cause__, ExportBusy)
        assert str(caught.value.__cause__) == (
            f"export {export_id} is being written by another worker; will retry"
        )
        # Out of retries, the wrapper gives up, but must not mark a running export failed.
        ctx["job_try"] = settings.max_retries + 1
        with pytest.raises(PermanentError, match="gave up after 4 tries"):
            await generate_contact_export.run(ctx, export_id=str(export_id))
        row = await export_row(sessions, export_id)
        assert (row.status, row.error, row.started_at) == ("pending", None, None)
        assert files_under(storage.root) == []
    finally:
        await holder.close()  # the lock goes with the session
    await mark_failed(ctx, {"export_id": str(export_id)}, "S3 is gone")
    row = await export_row(sessions, export_id)
    assert (row.status, row.error) == ("failed", "S3 is gone")


async def test_mark_failed_never_overwrites_a_completed_export(
    open_ctx: CtxOpener, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    export_id = await new_export(sessions, user)
    ctx = await open_ctx("exports", storage=LocalStorage(tmp_path))
    await generate_contact_export.run(ctx, export_id=str(export_id))
    await mark_failed(ctx, {"export_id": str(export_id)}, "late failure of a duplicate")
    row = await export_row(sessions, export_id)
    assert (row.status, row.error) == ("completed", None)

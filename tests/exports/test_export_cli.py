"""`python -m worker export ...` as an operator runs it: a real subprocess, a burst worker."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import Export
from tests.conftest import RunBurst
from tests.exports.factories import CONTACT_HEADER, UPDATED_ISO, Rows, iso, same_rows
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        EXPORT_DIR=str(settings.export_dir),
        STORAGE_BACKEND="local",
        LOG_LEVEL="WARNING",
        COLUMNS="100",
        **extra,
    )
    return env


async def start_cli(settings: Settings, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "export",
        *args,
        cwd=ROOT,
        env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def wait_for_export(sessions: async_sessionmaker[AsyncSession]) -> Export:
    for _ in range(300):
        async with sessions() as session:
            row = await session.scalar(select(Export))
        if row is not None:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError("the CLI never created the export")


async def test_follow_prints_row_count_and_path_once_a_worker_ran_it(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], run_burst: RunBurst
) -> None:
    rows = Rows(sessions)
    user = await rows.user("Owner@Example.com")
    a = await rows.contact(user, "a@example.com", first_name="@me")
    b = await rows.contact(user, "b@example.com")

    process = await start_cli(settings, "contacts", "--user", "owner@example.COM", "--follow")
    export = await wait_for_export(sessions)
    await run_burst("exports")
    code, out, _ = await finish(process)

    path = settings.export_dir.resolve() / str(user) / f"{export.id}.csv"
    assert (code, out) == (0, f"export {export.id} completed: 2 rows\n{path}\n")
    assert same_rows(path.read_text()) == same_rows(
        CONTACT_HEADER
        + f"{a},a@example.com,'@me,,,,,,,,,{iso(0)},{UPDATED_ISO}\n"
        + f"{b},b@example.com,,,,,,,,,,{iso(1)},{UPDATED_ISO}\n"
    )


async def test_follow_prints_the_error_and_exits_1_when_the_export_fails(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], run_burst: RunBurst
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    blocked = settings.export_dir / str(user)
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the user's directory should be")
    try:
        process = await start_cli(settings, "companies", "--user", str(user), "--follow")
        export = await wait_for_export(sessions)
        await run_burst("exports")
        code, out, _ = await finish(process)
    finally:
        blocked.unlink()
    assert code == 1
    # The export's error is what its user may read; the path is in the worker's log.
    assert out == (
        f"export {export.id} failed: the export file could not be written (a storage problem "
        "on our side, logged for the operators); try again later, or contact support if it "
        "keeps happening\n"
    )


async def test_without_follow_it_queues_and_returns(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    user = await Rows(sessions).user()
    code, out, err = await finish(await start_cli(settings, "companies", "--user", str(user)))
    export = await wait_for_export(sessions)
    assert (code, out, err) == (0, f"export {export.id} queued: companies of user {user}\n", "")
    assert (export.kind, export.status, export.user_id) == ("companies", "pending", user)


async def test_unknown_user_is_one_line_and_exit_2(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    missing = uuid.uuid4()
    by_email = await finish(await start_cli(settings, "contacts", "--user", "nobody@example.com"))
    by_id = await finish(await start_cli(settings, "companies", "--user", str(missing), "--follow"))
    assert by_email == (2, "", "error: no user with email nobody@example.com\n")
    assert by_id == (2, "", f"error: no user with id {missing}\n")
    async with sessions() as session:
        assert (await session.scalar(select(Export))) is None

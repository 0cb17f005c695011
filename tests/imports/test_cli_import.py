"""`python -m worker import FILE --user ID|EMAIL [--follow]` in a subprocess, as operators do."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.imports.conftest import contact, contacts, write_file
from tests.support.users import new_user
from worker.import_source import user_import_dir
from worker.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


async def _cli(settings: Settings, *args: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "IMPORT_DIR": str(settings.import_dir),
        "LOG_LEVEL": "WARNING",
        "COLUMNS": "100",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "import", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _owner_email(sessions: Sessions, user_id: uuid.UUID) -> str:
    async with sessions() as session:
        email = await session.scalar(text("SELECT email FROM users WHERE id = :u"), {"u": user_id})
    assert isinstance(email, str)
    return email


async def _wait_for_import_row(sessions: Sessions) -> None:
    for _ in range(200):
        async with sessions() as session:
            if await session.scalar(text("SELECT count(*) FROM contact_import_jobs")):
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the CLI created no import")


async def test_import_follow_copies_the_file_and_reports(
    settings: Settings, sessions: Sessions, user_id: uuid.UUID, run_burst: RunBurst, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "people.csv"
    elsewhere.write_text("email,first_name\nann@x.io,Ann\nnope,N\nANN@x.io,Anna\n")
    email = await _owner_email(sessions, user_id)
    cli = await _cli(settings, str(elsewhere), "--user", email.upper(), "--follow")
    await _wait_for_import_row(sessions)
    await run_burst("imports")
    stdout, stderr = await cli.communicate()
    out = stdout.decode()
    assert cli.returncode == 0, stderr.decode()
    assert "completed: 3 of 3 rows, 1 created, 1 updated, 1 with errors" in out
    assert "  row 3: email: not a valid email address" in out
    assert "rows/s" in out
    # Copied into the owner's own directory, the only place the worker reads for them.
    home = user_import_dir(settings, user_id)
    copies = [p for p in settings.import_dir.rglob("*") if p.name.endswith("-people.csv")]
    assert [p.parent for p in copies] == [home]
    assert copies[0].read_bytes() == elsewhere.read_bytes()
    assert await contacts(sessions, user_id) == [contact("ann@x.io", first_name="Anna")]


async def test_import_without_follow_by_user_id_only_enqueues(
    settings: Settings, sessions: Sessions, user_id: uuid.UUID
) -> None:
    path = write_file(settings, user_id, "email\na@x.io\n", name="in.csv")
    cli = await _cli(settings, path, "--user", str(user_id))
    stdout, stderr = await cli.communicate()
    assert (cli.returncode, stderr) == (0, b"")
    async with sessions() as session:
        row = (
            await session.execute(text("SELECT id, status, file_path FROM contact_import_jobs"))
        ).one()
    assert stdout.decode() == f"import {row.id} queued ({path})\n"
    assert (row.status, row.file_path) == ("pending", path)


async def test_a_file_in_another_users_directory_is_refused_not_copied(
    settings: Settings, sessions: Sessions, user_id: uuid.UUID
) -> None:
    other = await new_user(sessions)
    theirs = write_file(settings, other, "email\nother@x.io\n", name="theirs.csv")
    unowned = settings.import_dir / "unowned.csv"  # straight in IMPORT_DIR: nobody's
    unowned.write_text("email\nroot@x.io\n")
    for path in (theirs, str(unowned)):
        cli = await _cli(settings, path, "--user", str(user_id))
        stdout, stderr = await cli.communicate()
        assert (cli.returncode, stdout) == (2, b"")
        assert stderr.decode() == (
            f"error: {path} is in IMPORT_DIR but not in this user's directory "
            f"{user_import_dir(settings, user_id)}; import it for the user whose directory "
            "holds it\n"
        )
    async with sessions() as session:
        assert await session.scalar(text("SELECT count(*) FROM contact_import_jobs")) == 0
    home = user_import_dir(settings, user_id)
    assert not home.exists() or not any(home.iterdir())  # nothing copied either


async def test_unknown_user_is_one_clear_line(
    settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    (tmp_path / "x.csv").write_text("email\na@x.io\n")
    for user, shown in (("ghost@example.com", "email"), (str(uuid.UUID(int=7)), "id")):
        cli = await _cli(settings, str(tmp_path / "x.csv"), "--user", user)
        stdout, stderr = await cli.communicate()
        assert (cli.returncode, stdout) == (2, b"")
        assert stderr.decode() == f"error: no user with {shown} {user}\n"
    assert list(settings.import_dir.iterdir()) == []  # nothing copied for nobody

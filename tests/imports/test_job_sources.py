"""Where an import reads from: its user's own directory or S3 upload prefix, nothing else.

Client and job both check, against the row's owner; S3 through moto.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob
from tests.imports.conftest import (
    contact,
    contacts,
    counts,
    run_job,
    start_import,
    user_dir,
    write_file,
)
from tests.support.s3_server import S3TestServer
from tests.support.users import new_user
from worker.client import JobsClient
from worker.context import Ctx
from worker.errors import PermanentError
from worker.import_source import user_import_dir

Sessions = async_sessionmaker[AsyncSession]

MOVED = (
    "the import file is no longer where it was uploaded (moved, replaced or deleted); "
    "upload it again and start a new import"
)


async def _jobs_count(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ContactImportJob)) or 0)


async def test_client_refuses_paths_outside_the_users_directory_and_escaping_symlinks(
    jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text("email\nx@x.io\n")
    (user_dir(jobs_client.settings, user_id) / "escape.csv").symlink_to(outside)
    for path in (str(outside), "../../outside.csv", "escape.csv"):
        with pytest.raises(ValueError, match=f"outside IMPORT_DIR/{user_id}/"):
            await jobs_client.import_contacts(user_id, path)
    assert await _jobs_count(sessions) == 0


async def test_user_a_cannot_import_user_bs_files_by_any_path(
    jobs_client: JobsClient, sessions: Sessions, redis_raw: aioredis.Redis
) -> None:
    attacker, victim = await new_user(sessions), await new_user(sessions)
    settings = jobs_client.settings
    write_file(settings, victim, "email\nvictim@x.io\n", name="contacts.csv")
    theirs = user_dir(settings, victim) / "contacts.csv"
    mine = user_dir(settings, attacker)
    (mine / "link.csv").symlink_to(theirs)  # a link in A's directory to B's file
    (mine / "inbox").symlink_to(user_dir(settings, victim))  # ... or to B's whole directory
    (settings.import_dir / "unowned.csv").write_text("email\nroot@x.io\n")  # no owner at all
    # A user whose own directory is a link to B's: nothing there counts as theirs.
    impostor = await new_user(sessions)
    user_import_dir(settings, impostor).symlink_to(user_dir(settings, victim))
    attempts = [
        (attacker, str(theirs)),
        (attacker, f"../{victim}/contacts.csv"),
        (attacker, f"{mine}/../{victim}/contacts.csv"),
        (attacker, "link.csv"),
        (attacker, "inbox/contacts.csv"),
        (attacker, "../unowned.csv"),
        (attacker, str(settings.import_dir / "unowned.csv")),
        (impostor, "contacts.csv"),
    ]
    for user, path in attempts:
        with pytest.raises(ValueError, match=f"outside IMPORT_DIR/{user}/"):
            await jobs_client.import_contacts(user, path)
    assert await _jobs_count(sessions) == 0
    assert await redis_raw.zcard("imports") == 0
    # B's own import of the same file is fine.
    status = await jobs_client.import_contacts(victim, "contacts.csv")
    assert status.status == "pending"


async def test_job_refuses_a_symlink_swapped_after_the_client_checked(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.csv"
    outside.write_text("email\nsecret@x.io\n")
    import_id = await start_import(jobs_client, user_id, "email\nok@x.io\n", name="swap.csv")
    home = user_dir(jobs_client.settings, user_id)
    swapped = home / "swap.csv"
    swapped.unlink()
    swapped.symlink_to(outside)
    with pytest.raises(PermanentError, match="outside IMPORT_DIR"):
        await run_job(ctx, import_id)
    status = await jobs_client.import_status(import_id)
    assert counts(status) == ("failed", None, 0, 0, 0, 0)
    # The paths are for the operators' log (the job's PermanentError), not the user's row.
    assert status.message == MOVED
    assert str(outside) not in status.message
    assert await contacts(sessions, user_id) == []


async def test_job_rechecks_the_owner_of_a_row_naming_another_users_file(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions
) -> None:
    """A row written around the client (an older client, a bug in the app) is checked again
    against its own `user_id` before anything is read."""
    attacker, victim = await new_user(sessions), await new_user(sessions)
    write_file(jobs_client.settings, victim, "email\nvictim@x.io\n", name="contacts.csv")
    theirs = user_dir(jobs_client.settings, victim) / "contacts.csv"
    for path in (str(theirs), "/etc/passwd"):
        import_id = uuid.uuid4()
        async with sessions.begin() as session:
            await session.execute(
                text(
                    "INSERT INTO contact_import_jobs (id, user_id, file_path) VALUES (:i, :u, :p)"
                ),
                {"i": import_id, "u": attacker, "p": path},
            )
        with pytest.raises(PermanentError, match=f"outside IMPORT_DIR/{attacker}/"):
            await run_job(ctx, import_id)
        status = await jobs_client.import_status(import_id)
        assert (status.status, status.message) == ("failed", MOVED)
    assert await contacts(sessions, attacker) == []


async def test_s3_source_streams_through_moto(
    s3_ctx: Ctx,
    jobs_client: JobsClient,
    s3_server: S3TestServer,
    s3_bucket: str,
    sessions: Sessions,
) -> None:
    user = await new_user(sessions, "s3@x.io")
    body = "email;first_name\r\n" + "".join(f"p{i}@x.io;P{i}\r\n" for i in range(5)) + "bad;x\r\n"
    key = f"uploads/{user}/in/people.csv"
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=body.encode())
    client = JobsClient(
        redis=jobs_client.redis, sessions=jobs_client.sessions, settings=s3_ctx["settings"]
    )
    status = await client.import_contacts(user, f"s3://{s3_bucket}/{key}")
    await run_job(s3_ctx, status.id)
    assert counts(await client.import_status(status.id)) == ("completed", 6, 6, 5, 0, 1)
    assert await contacts(sessions, user) == [
        contact(f"p{i}@x.io", first_name=f"P{i}") for i in range(5)
    ]


async def test_a_missing_s3_object_fails_the_import(
    s3_ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, s3_bucket: str
) -> None:
    client = JobsClient(
        redis=jobs_client.redis, sessions=jobs_client.sessions, settings=s3_ctx["settings"]
    )
    status = await client.import_contacts(user_id, f"s3://{s3_bucket}/uploads/{user_id}/nope.csv")
    with pytest.raises(PermanentError, match="NoSuchKey"):
        await run_job(s3_ctx, status.id)
    failed = await client.import_status(status.id)
    assert failed.status == "failed"
    assert failed.message == (
        "the file is not in storage (deleted, or never uploaded); upload it again"
    )


async def test_user_a_cannot_import_user_bs_upload_or_export_keys(
    s3_ctx: Ctx,
    jobs_client: JobsClient,
    s3_server: S3TestServer,
    s3_bucket: str,
    sessions: Sessions,
    redis_raw: aioredis.Redis,
) -> None:
    attacker, victim = await new_user(sessions), await new_user(sessions)
    s3 = s3_server.client()
    # Real objects: the refusal must not depend on a key being absent.
    theirs = f"uploads/{victim}/contacts.csv"
    export = f"exports/{victim}/{uuid.uuid4()}.csv"
    for key in (theirs, export, f"uploads/{attacker}/../{victim}/contacts.csv"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"email\nvictim@x.io\n")
    client = JobsClient(
        redis=jobs_client.redis, sessions=jobs_client.sessions, settings=s3_ctx["settings"]
    )
    mine = f"s3://{s3_bucket}/uploads/{attacker}/"
    attempts = {
        f"s3://{s3_bucket}/{theirs}": "must come from",
        f"s3://{s3_bucket}/{export}": "must come from",
        f"s3://{s3_bucket}/exports/{attacker}/x.csv": "must come from",  # exports, even one's own
        f"s3://{s3_bucket}/contacts.csv": "must come from",
        f"s3://other-{s3_bucket}/uploads/{attacker}/x.csv": "must come from",
        mine: "must come from",
        f"{mine}../{victim}/contacts.csv": "'..' segments",
        f"{mine}./x.csv": "'..' segments",
        f"{mine}a//b.csv": "'..' segments",
        f"{mine}a\\..\\b.csv": "backslashes",
    }
    for path, message in attempts.items():
        with pytest.raises(ValueError, match=message):
            await client.import_contacts(attacker, path)
    assert await _jobs_count(sessions) == 0
    assert await redis_raw.zcard("imports") == 0
    # A row naming B's key for A, written around the client, fails at the job's re-check.
    import_id = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO contact_import_jobs (id, user_id, file_path) VALUES (:i, :u, :p)"),
            {"i": import_id, "u": attacker, "p": f"s3://{s3_bucket}/{theirs}"},
        )
    with pytest.raises(PermanentError, match="must come from"):
        await run_job(s3_ctx, import_id)
    assert (await client.import_status(import_id)).status == "failed"
    assert await contacts(sessions, attacker) == []

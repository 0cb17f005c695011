"""Where an import reads from: IMPORT_DIR only (client and job both check), or S3 (moto)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import aioboto3
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob
from tests.imports.conftest import contact, contacts, counts, run_job, start_import
from tests.support.s3_server import S3TestServer
from worker.client import JobsClient
from worker.context import Ctx
from worker.errors import PermanentError

Sessions = async_sessionmaker[AsyncSession]

MOVED = (
    "the import file is no longer where it was uploaded (moved, replaced or deleted); "
    "upload it again and start a new import"
)


async def _jobs_count(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(ContactImportJob)) or 0)


async def test_client_refuses_paths_outside_import_dir_and_escaping_symlinks(
    jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_text("email\nx@x.io\n")
    (jobs_client.settings.import_dir / "escape.csv").symlink_to(outside)
    for path in (str(outside), "../outside.csv", "escape.csv"):
        with pytest.raises(ValueError, match="outside IMPORT_DIR"):
            await jobs_client.import_contacts(user_id, path)
    assert await _jobs_count(sessions) == 0


async def test_job_refuses_a_symlink_swapped_after_the_client_checked(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.csv"
    outside.write_text("email\nsecret@x.io\n")
    import_id = await start_import(jobs_client, user_id, "email\nok@x.io\n", name="swap.csv")
    swapped = jobs_client.settings.import_dir / "swap.csv"
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


async def test_job_refuses_a_row_that_names_a_file_outside_import_dir(
    ctx: Ctx, jobs_client: JobsClient, user_id: uuid.UUID, sessions: Sessions
) -> None:
    import_id = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO contact_import_jobs (id, user_id, file_path) VALUES (:i, :u, :p)"),
            {"i": import_id, "u": user_id, "p": "/etc/passwd"},
        )
    with pytest.raises(PermanentError, match="outside IMPORT_DIR"):
        await run_job(ctx, import_id)
    status = await jobs_client.import_status(import_id)
    assert (status.status, status.message) == ("failed", MOVED)


@pytest.fixture
def s3_bucket(s3_server: S3TestServer) -> str:
    name = f"imports-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_ctx(ctx: Ctx, s3_server: S3TestServer, s3_bucket: str) -> Ctx:
    settings = ctx["settings"].model_copy(
        update={
            "s3_bucket": s3_bucket,
            "s3_endpoint_url": s3_server.endpoint_url,
            "s3_region": "us-east-1",
            "import_batch_rows": 2,
        }
    )
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"  # moto's dummies, never real ones
    return {**ctx, "settings": settings, "s3_session": aioboto3.Session()}


async def test_s3_source_streams_through_moto(
    s3_ctx: Ctx,
    jobs_client: JobsClient,
    s3_server: S3TestServer,
    s3_bucket: str,
    sessions: Sessions,
) -> None:
    user = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO users (id, email) VALUES (:i, 's3@x.io')"), {"i": user}
        )
    body = "email;first_name\r\n" + "".join(f"p{i}@x.io;P{i}\r\n" for i in range(5)) + "bad;x\r\n"
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/people.csv", Body=body.encode())
    client = JobsClient(
        redis=jobs_client.redis, sessions=jobs_client.sessions, settings=s3_ctx["settings"]
    )
    status = await client.import_contacts(user, f"s3://{s3_bucket}/in/people.csv")
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
    status = await client.import_contacts(user_id, f"s3://{s3_bucket}/nope.csv")
    with pytest.raises(PermanentError, match="NoSuchKey"):
        await run_job(s3_ctx, status.id)
    failed = await client.import_status(status.id)
    assert failed.status == "failed"
    assert failed.message == (
        "the file is not in storage (deleted, or never uploaded); upload it again"
    )

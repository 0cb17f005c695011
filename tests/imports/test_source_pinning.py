"""Every pass and every run of an import reads the same bytes, or the import fails clearly.

A local file is opened once, walking the path without following links, and read through that
descriptor (a path component swapped for a symlink later leads nowhere); local files are pinned
by inode, size and mtime and S3 objects by ETag at the first read, so a resume or continuation
on a changed file fails instead of skipping rows of other bytes; the encoding chosen by the
first run (from the whole file) is reused by a resume.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import jobs.imports.job as import_job
from jobs.imports.checkpoint import ImportRow
from jobs.imports.job import ImportResult, run_import
from jobs.imports.reader import CsvReader
from jobs.imports.sniff import SNIFF_BYTES
from jobs.imports.sources import CHANGED_MESSAGE
from tests.imports.conftest import (
    contacts,
    counts,
    run_job,
    start_import,
    user_dir,
    write_file,
)
from tests.support.result_shapes import assert_shape
from tests.support.s3_server import S3TestServer
from tests.support.users import new_user
from worker.client import JobsClient
from worker.context import Ctx
from worker.errors import PermanentError
from worker.import_source import resolve_import_source

Sessions = async_sessionmaker[AsyncSession]
BATCH_ROWS = 4


class Interrupted(Exception):
    """Stands for a worker killed after a committed batch."""


def people(prefix: str, rows: int = 10) -> str:
    return "email,first_name\n" + "".join(f"{prefix}{i}@x.io,P{i}\n" for i in range(rows))


def _batches(ctx: Ctx, rows: int = BATCH_ROWS, **more: Any) -> Ctx:
    update = {"import_batch_rows": rows, **more}
    return {**ctx, "settings": ctx["settings"].model_copy(update=update)}


async def _stop_after_first_batch(row: ImportRow) -> None:
    raise Interrupted


async def _emails(sessions: Sessions, user: uuid.UUID) -> list[str]:
    return [row["email"] for row in await contacts(sessions, user)]


async def _pin_and_encoding(sessions: Sessions, import_id: uuid.UUID) -> tuple[Any, Any]:
    async with sessions() as session:
        row = (
            await session.execute(
                text("SELECT source_pin, source_encoding FROM contact_import_jobs WHERE id = :i"),
                {"i": import_id},
            )
        ).one()
    return row[0], row[1]


# ---- L6: one descriptor, no link followed after the check ----------------------------------


@pytest.fixture
def victim_dir(jobs_client: JobsClient, tmp_path: Path) -> Path:
    """Another user's directory with a same-named file an attacker would like to read."""
    victim = uuid.uuid4()
    write_file(jobs_client.settings, victim, people("stolen", 30), name="people.csv")
    return user_dir(jobs_client.settings, victim)


def _swap_for_link(path: Path, target: Path) -> None:
    """Move `path` away and put a symlink to `target` in its place."""
    path.rename(path.with_name(path.name + "-old"))
    path.symlink_to(target)


async def test_a_component_swapped_for_a_link_between_passes_is_not_followed(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    victim_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, people("mine"), name="sub/people.csv")
    sub = user_dir(jobs_client.settings, user) / "sub"
    real_count_rows = CsvReader.count_rows

    async def swap_then_count(reader: CsvReader) -> int:
        # After the check and the head pass, before the counting and data passes.
        _swap_for_link(sub, victim_dir)
        return await real_count_rows(reader)

    monkeypatch.setattr(CsvReader, "count_rows", swap_then_count)
    await run_job(_batches(ctx), import_id)
    assert (sub / "people.csv").read_text().startswith("email,first_name\nstolen0@")  # swapped
    assert counts(await jobs_client.import_status(import_id)) == ("completed", 10, 10, 10, 0, 0)
    assert await _emails(sessions, user) == sorted(f"mine{i}@x.io" for i in range(10))


@pytest.mark.parametrize("component", ["directory", "file"])
async def test_a_component_swapped_for_a_link_after_the_check_fails_the_open(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    victim_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    component: str,
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, people("mine"), name="sub/people.csv")
    sub = user_dir(jobs_client.settings, user) / "sub"
    real_check = resolve_import_source  # the job's own, patched in its module below

    def check_then_swap(*args: Any) -> str:
        checked = real_check(*args)
        if component == "directory":
            _swap_for_link(sub, victim_dir)
        else:
            _swap_for_link(sub / "people.csv", victim_dir / "people.csv")
        return checked

    monkeypatch.setattr(import_job, "resolve_import_source", check_then_swap)
    with pytest.raises(PermanentError, match="moved or replaced by a link"):
        await run_job(_batches(ctx), import_id)
    status = await jobs_client.import_status(import_id)
    assert counts(status) == ("failed", None, 0, 0, 0, 0)
    assert status.message == (
        "the import file was moved or replaced by a link while the import started; "
        "upload it again as a new import"
    )
    assert await contacts(sessions, user) == []


async def test_a_file_rewritten_in_place_between_passes_fails_clearly(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, people("mine"), name="people.csv")
    path = user_dir(jobs_client.settings, user) / "people.csv"
    real_count_rows = CsvReader.count_rows

    async def rewrite_then_count(reader: CsvReader) -> int:
        with path.open("r+b") as same_inode:
            same_inode.write(people("other", 12).encode())
        return await real_count_rows(reader)

    monkeypatch.setattr(CsvReader, "count_rows", rewrite_then_count)
    with pytest.raises(PermanentError, match="the file changed"):
        await run_job(_batches(ctx), import_id)
    status = await jobs_client.import_status(import_id)
    assert (status.status, status.processed_rows, status.message) == ("failed", 0, CHANGED_MESSAGE)
    assert await contacts(sessions, user) == []


# ---- M10: a resume or continuation on a changed source fails -------------------------------


def _replace(path: Path, how: str) -> None:
    new = people("other", 12).encode()
    if how == "rename-over":  # what most uploaders do: write a temporary file, rename it
        temporary = path.with_name("upload.tmp")
        temporary.write_bytes(new)
        temporary.replace(path)
    else:  # the same inode, other bytes
        with path.open("r+b") as same_inode:
            same_inode.write(new)


async def _first_run(ctx: Ctx, import_id: uuid.UUID, when: str) -> None:
    """One committed batch, then a kill (resume) or the soft time limit (continuation)."""
    if when == "resume":
        with pytest.raises(Interrupted):
            await run_import(ctx, import_id, after_batch=_stop_after_first_batch)
    else:
        summary = await run_import({**ctx, "soft_deadline": 0.0}, import_id)
        assert_shape(summary, ImportResult)
        assert summary["note"] == f"continued as import:{import_id}:from:{BATCH_ROWS}"


@pytest.mark.parametrize("how", ["rename-over", "in-place"])
@pytest.mark.parametrize("when", ["resume", "continuation"])
async def test_a_local_file_replaced_before_the_next_run_fails_the_import(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions, how: str, when: str
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, people("mine"), name="people.csv")
    small = _batches(ctx)
    await _first_run(small, import_id, when)
    pin, _ = await _pin_and_encoding(sessions, import_id)
    _replace(user_dir(jobs_client.settings, user) / "people.csv", how)
    with pytest.raises(PermanentError, match="the file changed"):
        await run_job(small, import_id)
    status = await jobs_client.import_status(import_id)
    assert counts(status) == ("failed", 10, BATCH_ROWS, BATCH_ROWS, 0, 0)
    assert status.message == CHANGED_MESSAGE
    assert await _emails(sessions, user) == [f"mine{i}@x.io" for i in range(BATCH_ROWS)]
    assert pin is not None and pin.startswith("file inode=")


async def test_an_s3_object_replaced_before_the_resume_fails_the_import(
    s3_ctx: Ctx,
    jobs_client: JobsClient,
    s3_server: S3TestServer,
    s3_bucket: str,
    sessions: Sessions,
) -> None:
    user = await new_user(sessions)
    key = f"uploads/{user}/people.csv"
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key=key, Body=people("mine").encode())
    client = JobsClient(
        redis=jobs_client.redis, sessions=jobs_client.sessions, settings=s3_ctx["settings"]
    )
    import_id = (await client.import_contacts(user, f"s3://{s3_bucket}/{key}")).id
    small = _batches(s3_ctx)
    with pytest.raises(Interrupted):
        await run_import(small, import_id, after_batch=_stop_after_first_batch)
    pin, _ = await _pin_and_encoding(sessions, import_id)
    etag = s3.head_object(Bucket=s3_bucket, Key=key)["ETag"]
    # The web app reuses the key for the user's next upload while the import waits.
    s3.put_object(Bucket=s3_bucket, Key=key, Body=people("other", 12).encode())
    with pytest.raises(PermanentError, match="the file changed"):
        await run_job(small, import_id)
    status = await client.import_status(import_id)
    assert counts(status) == ("failed", 10, BATCH_ROWS, BATCH_ROWS, 0, 0)
    assert status.message == CHANGED_MESSAGE
    assert await _emails(sessions, user) == [f"mine{i}@x.io" for i in range(BATCH_ROWS)]
    assert pin == f"s3 etag={etag}"


# ---- L10: a resume decodes as the first run decided -----------------------------------------


def _late_cp1252_file(rows: int = 3000) -> bytes:
    """Valid UTF-8 (with `ë` as two bytes) for the first 64 KiB and far beyond, then one byte
    that is not UTF-8: the whole file is Windows-1252, which only the counting pass finds."""
    lines = [b"email,first_name,city\n"]
    lines += [f"p{i}@x.io,Zo\u00eb{i},City {i}\n".encode() for i in range(rows - 1)]
    lines.append(b"late@x.io,Caf\xe9,Paris\n")
    data = b"".join(lines)
    assert data.index(b"\xe9") > 1.3 * SNIFF_BYTES
    return data


async def test_a_resume_reuses_the_encoding_the_first_run_chose(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions
) -> None:
    data = _late_cp1252_file()
    small = _batches(ctx, rows=500)
    reference_user, user = await new_user(sessions), await new_user(sessions)
    await run_job(small, await start_import(jobs_client, reference_user, data))
    uninterrupted = await contacts(sessions, reference_user)
    # The whole file is read as Windows-1252: `ë` in UTF-8 bytes shows as two characters.
    assert {"email": "p2000@x.io", "first_name": "Zo\u00c3\u00ab2000"}.items() <= next(
        row for row in uninterrupted if row["email"] == "p2000@x.io"
    ).items()
    import_id = await start_import(jobs_client, user, data)
    with pytest.raises(Interrupted):
        await run_import(small, import_id, after_batch=_stop_after_first_batch)
    _, encoding = await _pin_and_encoding(sessions, import_id)
    await run_job(small, import_id)
    status = await jobs_client.import_status(import_id)
    assert counts(status) == ("completed", 3000, 3000, 3000, 0, 0)
    assert await contacts(sessions, user) == uninterrupted
    assert encoding == "cp1252"

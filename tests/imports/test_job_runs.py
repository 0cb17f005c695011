"""Runs of one import: resume after a kill, concurrent runners, cancel, soft time limit, retry."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
from arq.worker import Retry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import jobs.imports.checkpoint as checkpoint
import jobs.imports.merge
from jobs.imports.checkpoint import ImportRow, apply_batch, record_failure
from jobs.imports.job import ImportResult, run_import
from jobs.imports.lease import ImportRunningElsewhere
from jobs.imports.merge import prepare
from tests.conftest import RunBurst
from tests.imports.conftest import contacts, counts, run_job, start_import
from tests.support.result_shapes import assert_shape
from tests.support.users import new_user
from worker.client import JobsClient
from worker.context import Ctx

Sessions = async_sessionmaker[AsyncSession]
BATCH_ROWS = 7


def sample_csv(rows: int = 50) -> str:
    """Repeated emails (other case, spaces), company spellings, empty cells, invalid rows."""
    lines = ["email,first_name,company,city"]
    for i in range(rows):
        if i % 11 == 5:
            lines.append(f"broken{i},x,,")
        elif i % 7 == 3:
            lines.append(f" USER{i % 5}@X.io ,,CO {i % 3},City {i}")
        else:
            lines.append(f"user{i % 17}@x.io,Name {i},co {i % 3},")
    return "\n".join(lines) + "\n"


def oracle(data: str) -> tuple[tuple[int, int, int], list[dict[str, Any]]]:
    """What applying `sample_csv` rows one at a time gives: (created, updated, errors), rows."""
    people: dict[str, dict[str, Any]] = {}
    spelling: dict[str, str] = {}
    created = updated = errors = 0
    for line in data.splitlines()[1:]:
        email, first_name, company, city = (v.strip() for v in line.split(","))
        if "@" not in email:
            errors += 1
            continue
        email = email.lower()
        if email in people:
            updated += 1
        else:
            created += 1
            people[email] = {"first_name": None, "company": None, "city": None}
        spelt = spelling.setdefault(company.lower(), company) if company else None
        for key, value in (("first_name", first_name), ("company", spelt), ("city", city)):
            if value:
                people[email][key] = value
    rows = [{"email": email, **people[email]} for email in sorted(people)]
    return (created, updated, errors), rows


async def _result(
    sessions: Sessions, jobs_client: JobsClient, user: uuid.UUID, import_id: Any
) -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
    status = await jobs_client.import_status(import_id)
    rows = [
        {k: row[k] for k in ("email", "first_name", "company", "city")}
        for row in await contacts(sessions, user)
    ]
    return counts(status), rows


def _small_batches(ctx: Ctx, **more: Any) -> Ctx:
    update = {"import_batch_rows": BATCH_ROWS, **more}
    return {**ctx, "settings": ctx["settings"].model_copy(update=update)}


@pytest.fixture
def expected() -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
    (created, updated, errors), rows = oracle(sample_csv())
    return ("completed", 50, 50, created, updated, errors), rows


async def test_oracle_matches_an_uninterrupted_run(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions, expected: Any
) -> None:
    assert expected[0] == ("completed", 50, 50, 17, 28, 5)
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    await run_job(_small_batches(ctx), import_id)
    assert await _result(sessions, jobs_client, user, import_id) == expected


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("where", ["at-batch-boundary", "mid-transaction"])
async def test_resume_after_interruption_ends_like_an_uninterrupted_run(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    expected: Any,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    small = _small_batches(ctx)
    if where == "at-batch-boundary":

        async def stop(row: ImportRow) -> None:
            if row.processed_rows == 3 * BATCH_ROWS:
                raise Interrupted

        with pytest.raises(Interrupted):
            await run_import(small, import_id, after_batch=stop)
    else:
        # The task is cancelled inside batch 4's transaction, after its rows were merged.
        real_merge = jobs.imports.merge.merge_part  # what checkpoint calls, patched there
        task: asyncio.Task[Any] | None = None

        async def merge_then_die(connection: Any, *args: Any, **kwargs: Any) -> Any:
            merged = await real_merge(connection, *args, **kwargs)
            if await connection.fetchval("SELECT processed_rows FROM contact_import_jobs") == 21:
                assert task is not None
                task.cancel()
                await asyncio.sleep(0)
            return merged

        monkeypatch.setattr(checkpoint, "merge_part", merge_then_die)
        task = asyncio.create_task(run_import(small, import_id))
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.undo()
    halfway = await jobs_client.import_status(import_id)
    assert counts(halfway)[:3] == ("processing", 50, 21)
    await run_job(small, import_id)
    assert await _result(sessions, jobs_client, user, import_id) == expected


async def test_resume_after_one_part_committed_redoes_only_the_other(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    expected: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    real_merge = jobs.imports.merge.merge_part  # what checkpoint calls, patched there
    victim: list[int] = []

    async def one_part_dies(connection: Any, *args: Any, **kwargs: Any) -> Any:
        # In batch 4, the first part to get here waits for the other to commit, then dies.
        if await connection.fetchval("SELECT processed_rows FROM contact_import_jobs") != 21:
            return await real_merge(connection, *args, **kwargs)
        if victim:
            return await real_merge(connection, *args, **kwargs)
        victim.append(1)
        for _ in range(500):
            if await connection.fetchval("SELECT batch_parts_done FROM contact_import_jobs"):
                raise Interrupted
            await asyncio.sleep(0.01)
        raise AssertionError("the other part never committed")

    monkeypatch.setattr(checkpoint, "merge_part", one_part_dies)
    with pytest.raises(Interrupted):
        await run_import(_small_batches(ctx), import_id)
    monkeypatch.undo()
    async with sessions() as session:
        state = (
            await session.execute(
                text(
                    "SELECT processed_rows, batch_rows, batch_parts_done "
                    "FROM contact_import_jobs WHERE id = :id"
                ),
                {"id": import_id},
            )
        ).one()
    assert state[:2] == (21, 7) and state[2] in (1, 2)
    # Resumed with another batch size: the half-done batch is still read as the same 7 rows.
    await run_job(_small_batches(ctx, import_batch_rows=5), import_id)
    assert await _result(sessions, jobs_client, user, import_id) == expected


async def test_a_second_runner_backs_off_while_the_first_runs(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions, expected: Any
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    small = _small_batches(ctx)
    paused, resume = asyncio.Event(), asyncio.Event()

    async def pause_once(row: ImportRow) -> None:
        if row.processed_rows == BATCH_ROWS:
            paused.set()
            await resume.wait()

    first = asyncio.create_task(run_import(small, import_id, after_batch=pause_once))
    await paused.wait()
    with pytest.raises(ImportRunningElsewhere, match="import is running elsewhere"):
        await run_import(small, import_id)
    with pytest.raises(Retry):  # through the wrapper: retried later, not failed
        await run_job(small, import_id)
    # A delivery that gave up must not fail the import its owner is running.
    await record_failure(small, {"job_id": str(import_id)}, "gave up after 4 tries")
    # Even with the owner's own lease token, a batch from a stale checkpoint is refused by
    # the row guard.
    async with sessions() as session:
        owner = await session.scalar(
            text("SELECT lease_owner FROM contact_import_jobs WHERE id = :id"), {"id": import_id}
        )
    stale = prepare([], [], 7)
    with pytest.raises(ImportRunningElsewhere):
        await apply_batch(
            sessions, import_id, owner, 0, stale, max_stored_errors=10, cancel_message=""
        )
    assert counts(await jobs_client.import_status(import_id))[:3] == ("processing", 50, 7)
    resume.set()
    summary = await first
    assert summary["status"] == "completed"
    assert await _result(sessions, jobs_client, user, import_id) == expected
    again = await run_job(small, import_id)
    assert again["note"] == "already completed, nothing to do"
    assert await _result(sessions, jobs_client, user, import_id) == expected


async def test_cancel_stops_at_the_next_batch_boundary(
    ctx: Ctx, jobs_client: JobsClient, sessions: Sessions
) -> None:
    user = await new_user(sessions)
    data = sample_csv()
    import_id = await start_import(jobs_client, user, data)

    async def cancel_after_two(row: ImportRow) -> None:
        if row.processed_rows == 2 * BATCH_ROWS:
            await jobs_client.cancel_import(import_id)

    summary = await run_import(_small_batches(ctx), import_id, after_batch=cancel_after_two)
    assert_shape(summary, ImportResult)
    assert summary["status"] == "cancelled"
    status = await jobs_client.import_status(import_id)
    (created, updated, errors), rows = oracle("\n".join(data.splitlines()[:15]))
    assert counts(status) == ("cancelled", 50, 14, created, updated, errors)
    assert status.message == "cancelled after 14 of 50 rows"
    assert (status.percent, status.finished_at is not None) == (28.0, True)
    assert (await _result(sessions, jobs_client, user, import_id))[1] == rows
    # Run again (a late duplicate delivery): nothing changes.
    assert (await run_job(ctx, import_id))["note"] == "already cancelled, nothing to do"


async def test_soft_time_limit_continues_in_fresh_jobs_until_done(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    run_burst: RunBurst,
    expected: Any,
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    hurried = _small_batches(ctx, job_soft_timeout_s=1e-6)["settings"]
    worker = await run_burst("imports", settings_=hurried)
    # One batch per job: 50 rows in batches of 7 need 8 jobs, each continuing the last.
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (8, 0, 0)
    assert await _result(sessions, jobs_client, user, import_id) == expected
    last = await jobs_client.job_result(f"import:{import_id}:from:49", timeout_s=1)
    assert (last["status"], last["processed"]) == ("completed", 50)
    middle = await jobs_client.job_result(f"import:{import_id}:from:7", timeout_s=1)
    assert middle["note"] == f"continued as import:{import_id}:from:14"


async def test_through_the_client_and_a_burst_worker(
    jobs_client: JobsClient, sessions: Sessions, run_burst: RunBurst, user_id: uuid.UUID
) -> None:
    import_id = await start_import(jobs_client, user_id, "email,first_name\nA@x.io,Ann\nb,B\n")
    worker = await run_burst("imports")
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert counts(await jobs_client.import_status(import_id)) == ("completed", 2, 2, 1, 0, 1)
    assert await jobs_client.job_result(f"import:{import_id}", timeout_s=1) == {
        "import_id": str(import_id),
        "status": "completed",
        "processed": 2,
        "created": 1,
        "updated": 0,
        "errors": 1,
    }


async def test_a_terminated_database_connection_retries_and_resumes(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    expected: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    small = _small_batches(ctx)
    real_merge = jobs.imports.merge.merge_part  # what checkpoint calls, patched there
    url = small["settings"].database

    async def killed_in_batch_three(connection: Any, *args: Any, **kwargs: Any) -> Any:
        if await connection.fetchval("SELECT processed_rows FROM contact_import_jobs") == 14:
            admin = await asyncpg.connect(host=url.host, port=url.port, user=url.username)
            try:
                pid = await connection.fetchval("SELECT pg_backend_pid()")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
        return await real_merge(connection, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "merge_part", killed_in_batch_three)
    with pytest.raises(Retry):  # transient: arq retries it with backoff
        await run_job(small, import_id)
    monkeypatch.undo()
    assert counts(await jobs_client.import_status(import_id))[:3] == ("processing", 50, 14)
    await run_job(small, import_id)
    assert await _result(sessions, jobs_client, user, import_id) == expected


def _kill_connection_at(url: Any, rows: set[int]) -> Any:
    """A `merge_part` that terminates its own connection the first time a batch starts at one
    of `rows` (PostgreSQL's view of the checkpoint), as a failover or an operator would."""
    real_merge = jobs.imports.merge.merge_part
    killed: set[int] = set()

    async def merge_part(connection: Any, *args: Any, **kwargs: Any) -> Any:
        at = await connection.fetchval("SELECT processed_rows FROM contact_import_jobs")
        if at in rows and at not in killed:
            killed.add(at)
            admin = await asyncpg.connect(host=url.host, port=url.port, user=url.username)
            try:
                pid = await connection.fetchval("SELECT pg_backend_pid()")
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
            finally:
                await admin.close()
        return await real_merge(connection, *args, **kwargs)

    return merge_part


async def test_faults_between_committed_batches_do_not_use_up_the_tries(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    run_burst: RunBurst,
    expected: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long import on a busy cluster meets more faults than MAX_RETRIES in its life; each
    # try here commits two batches before its connection is killed. With no retries allowed
    # it still completes: a try that moved the checkpoint on is given back.
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    settings = _small_batches(ctx, max_retries=0)["settings"]
    monkeypatch.setattr(
        checkpoint, "merge_part", _kill_connection_at(settings.database, {14, 28, 42})
    )
    worker = await run_burst("imports", settings_=settings)
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (1, 0, 3)
    assert await _result(sessions, jobs_client, user, import_id) == expected


async def test_a_fault_before_any_batch_commits_still_uses_a_try(
    ctx: Ctx,
    jobs_client: JobsClient,
    sessions: Sessions,
    run_burst: RunBurst,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await new_user(sessions)
    import_id = await start_import(jobs_client, user, sample_csv())
    settings = _small_batches(ctx, max_retries=0)["settings"]
    monkeypatch.setattr(checkpoint, "merge_part", _kill_connection_at(settings.database, {0}))
    worker = await run_burst("imports", settings_=settings)
    assert (worker.jobs_complete, worker.jobs_failed) == (0, 1)
    status = await jobs_client.import_status(import_id)
    assert (status.status, status.processed_rows) == ("failed", 0)

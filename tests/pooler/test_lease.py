"""The import's lease on its job row (jobs/imports/lease.py), through PgBouncer.

Two runs of one import at once: one wins, the other bounces without writing. A run whose
lease was taken over commits nothing more (its batch rolls back). A lease nobody renews (its
run died) is waited out and taken, and the import resumes from its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import jobs.imports.checkpoint as checkpoint
import jobs.imports.merge
from jobs.imports.checkpoint import ImportRow
from jobs.imports.job import run_import
from jobs.imports.lease import LEASE_S, ImportRunningElsewhere
from jobs.imports.merge import PARTS
from tests.imports.conftest import contacts, counts, start_import
from tests.imports.test_job_runs import oracle, sample_csv
from tests.support.ctx import CtxOpener
from tests.support.users import new_user
from worker.client import JobsClient
from worker.context import Ctx
from worker.settings import Settings

Sessions = async_sessionmaker[AsyncSession]
BATCH_ROWS = 7


@pytest.fixture
async def pooled_ctx(pooled_settings: Settings, arq_redis: Any) -> AsyncIterator[Ctx]:
    """A job's ctx from the real startup, whose engine goes through PgBouncer."""
    opener = CtxOpener(pooled_settings, arq_redis)
    small = pooled_settings.model_copy(update={"import_batch_rows": BATCH_ROWS})
    yield await opener("imports", settings=small)
    await opener.close()


async def lease_of(sessions: Sessions, import_id: uuid.UUID) -> tuple[Any, ...]:
    async with sessions() as session:
        found = await session.execute(
            text(
                "SELECT lease_owner, processed_rows, batch_parts_done"
                " FROM contact_import_jobs WHERE id = :id"
            ),
            {"id": import_id},
        )
        return tuple(found.one())


async def set_lease(sessions: Sessions, import_id: uuid.UUID, owner: str, in_s: float) -> None:
    """What another run's take (or a dead run's last renewal) leaves on the row."""
    async with sessions.begin() as session:
        await session.execute(
            text(
                "UPDATE contact_import_jobs SET lease_owner = :owner,"
                " lease_expires_at = now() + make_interval(secs => :in_s) WHERE id = :id"
            ),
            {"id": import_id, "owner": owner, "in_s": in_s},
        )


async def result_of(
    sessions: Sessions, client: JobsClient, user: uuid.UUID, import_id: uuid.UUID
) -> tuple[Any, ...]:
    status = await client.import_status(import_id)
    rows = [
        {k: row[k] for k in ("email", "first_name", "company", "city")}
        for row in await contacts(sessions, user)
    ]
    return counts(status), rows


def expected(data: str) -> tuple[Any, ...]:
    (created, updated, errors), rows = oracle(data)
    total = len(data.splitlines()) - 1
    return ("completed", total, total, created, updated, errors), rows


async def test_two_runs_at_once_one_wins_and_the_other_writes_nothing(
    pooled_ctx: Ctx, pooled_client: JobsClient, sessions: Sessions
) -> None:
    user = await new_user(sessions)
    data = sample_csv()
    import_id = await start_import(pooled_client, user, data)
    loser_done = asyncio.Event()
    batches_seen: list[int] = []

    async def hold_after_first_batch(row: ImportRow) -> None:
        batches_seen.append(row.processed_rows)
        # The winner keeps its lease (renewing it) until the other run has given up.
        await asyncio.wait_for(loser_done.wait(), 30)

    second_ctx: Ctx = {**pooled_ctx, "job_id": "second-delivery", "job_try": 1}
    runs = [
        asyncio.create_task(run_import(ctx, import_id, after_batch=hold_after_first_batch))
        for ctx in (pooled_ctx, second_ctx)
    ]
    done, pending = await asyncio.wait(runs, return_when=asyncio.FIRST_COMPLETED)
    (loser,) = done
    assert isinstance(loser.exception(), ImportRunningElsewhere)
    bounced = loser.exception()
    assert isinstance(bounced, ImportRunningElsewhere)
    assert 0 < bounced.retry_after_s <= LEASE_S + 1  # back once the lease could have expired
    assert batches_seen == [BATCH_ROWS]  # only the winner committed a batch
    loser_done.set()
    (winner,) = pending
    assert (await winner)["status"] == "completed"
    assert batches_seen == [*range(BATCH_ROWS, 50, BATCH_ROWS), 50]
    assert await result_of(sessions, pooled_client, user, import_id) == expected(data)
    assert (await lease_of(sessions, import_id))[0] is None


async def test_a_run_whose_lease_was_taken_over_commits_nothing_more(
    pooled_ctx: Ctx,
    pooled_client: JobsClient,
    sessions: Sessions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await new_user(sessions)
    data = sample_csv()
    import_id = await start_import(pooled_client, user, data)
    real_merge = jobs.imports.merge.merge_part  # what checkpoint calls, patched there
    arrived: list[int] = []
    taken = asyncio.Event()

    async def taken_over_in_batch_three(connection: Any, *args: Any, **kwargs: Any) -> Any:
        row = await connection.fetchval(
            "SELECT processed_rows FROM contact_import_jobs WHERE id = $1", import_id
        )
        if row == 2 * BATCH_ROWS and not taken.is_set():
            # Both parts of batch three are in their transactions; then another run takes the
            # lease (as after an expiry), before either part commits.
            arrived.append(row)
            if len(arrived) == PARTS:
                await set_lease(sessions, import_id, "intruder", 60)
                taken.set()
            await asyncio.wait_for(taken.wait(), 10)
        return await real_merge(connection, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "merge_part", taken_over_in_batch_three)
    with pytest.raises(ImportRunningElsewhere):
        await run_import(pooled_ctx, import_id)
    monkeypatch.undo()
    # Batch three's parts rolled back: the checkpoint and the contacts are those of two batches,
    # and the intruder's lease is left alone.
    assert await lease_of(sessions, import_id) == ("intruder", 2 * BATCH_ROWS, 0)
    first_two = "\n".join(data.splitlines()[: 2 * BATCH_ROWS + 1]) + "\n"
    assert (await result_of(sessions, pooled_client, user, import_id))[1] == oracle(first_two)[1]
    # While the intruder renews its lease, a new run bounces.

    async def intruder_renews() -> None:
        while True:
            await asyncio.sleep(0.5)
            await set_lease(sessions, import_id, "intruder", 60)

    renewing = asyncio.create_task(intruder_renews())
    try:
        with pytest.raises(ImportRunningElsewhere):
            await run_import(pooled_ctx, import_id)
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing
    assert (await lease_of(sessions, import_id))[:2] == ("intruder", 2 * BATCH_ROWS)
    # Once it has expired, the next run takes it over and finishes from the checkpoint.
    await set_lease(sessions, import_id, "intruder", -1)
    assert (await run_import(pooled_ctx, import_id))["status"] == "completed"
    assert await result_of(sessions, pooled_client, user, import_id) == expected(data)


async def test_a_lease_nobody_renews_is_waited_out_and_taken(
    pooled_ctx: Ctx, pooled_client: JobsClient, sessions: Sessions
) -> None:
    user = await new_user(sessions)
    data = sample_csv()
    import_id = await start_import(pooled_client, user, data)
    # A run that died a moment ago: its lease has a few seconds left and nobody renews it.
    await set_lease(sessions, import_id, "dead-run", 2)
    summary = await run_import(pooled_ctx, import_id)
    assert summary["status"] == "completed"
    assert await result_of(sessions, pooled_client, user, import_id) == expected(data)


async def test_a_run_whose_lease_was_taken_over_after_its_last_batch_does_not_complete(
    pooled_ctx: Ctx, pooled_client: JobsClient, sessions: Sessions
) -> None:
    user = await new_user(sessions)
    data = sample_csv()
    import_id = await start_import(pooled_client, user, data)
    total = len(data.splitlines()) - 1

    async def taken_over_after_the_last_batch(row: ImportRow) -> None:
        if row.processed_rows == total:  # every row committed; the final state comes next
            await set_lease(sessions, import_id, "intruder", 60)

    with pytest.raises(ImportRunningElsewhere):
        await run_import(pooled_ctx, import_id, after_batch=taken_over_after_the_last_batch)
    # The row is the intruder's, still open: this run reported no end and wrote none.
    assert await lease_of(sessions, import_id) == ("intruder", total, 0)
    assert (await pooled_client.import_status(import_id)).status == "processing"

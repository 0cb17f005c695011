"""Waiting for a turn, through a real arq worker on the test's loop: it costs no tries, exports
share by their own cap with other users passing, and a parked job survives a Redis that lost
its data. A `hold_turn` job stands in for a user's long-running import or export: it runs
under the row's own arq id, so it holds that user's slot until the test lets it end."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.worker import Worker
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.exports.job import generate_contact_export
from jobs.imports import process_contacts_import
from tests.conftest import REDIS_OWNER_KEY, RunBurst
from tests.fairness.conftest import import_times, new_import, parked, picked_up, settings_with
from tests.reliability.conftest import wait_for
from tests.support.ctx import CtxOpener
from tests.support.redis_replies import reply
from tests.support.users import new_user
from worker import fairness
from worker.client import JobsClient
from worker.context import Ctx
from worker.job import job
from worker.reconcile import Expected, forgotten, reconcile_jobs
from worker.routes import PROCESS_CONTACTS_IMPORT, export_job_id, import_job_id
from worker.settings import Settings

pytestmark = pytest.mark.timeout(90)
Sessions = async_sessionmaker[AsyncSession]
RELEASE_KEY = "test:release-the-turn"
HELD_TABLES = {"import": "contact_import_jobs", "export": "exports"}


@job()
async def hold_turn(ctx: Ctx, kind: str, row_id: str) -> None:
    """Hold the row's user's slot until the test pushes to `RELEASE_KEY`; then finish the row."""
    assert await reply(ctx["redis"].blpop([RELEASE_KEY], timeout=60)) is not None
    async with ctx["sessions"].begin() as session:
        await session.execute(
            text(f"UPDATE {HELD_TABLES[kind]} SET status = 'completed' WHERE id = :id"),
            {"id": row_id},
        )


async def hold(arq_redis: ArqRedis, sessions: Sessions, kind: str, user_id: uuid.UUID) -> None:
    """A row of `user_id`, enqueued as a `hold_turn` job under the row's own arq id."""
    row_id = uuid.uuid4()
    columns = "file_path" if kind == "import" else "kind"
    async with sessions.begin() as session:
        await session.execute(
            text(
                f"INSERT INTO {HELD_TABLES[kind]} (id, user_id, {columns})"
                " VALUES (:id, :user, 'contacts')"
            ),
            {"id": row_id, "user": user_id},
        )
    arq_id = import_job_id(row_id) if kind == "import" else export_job_id(row_id)
    queue = "imports" if kind == "import" else "exports"
    await arq_redis.enqueue_job("hold_turn", kind, str(row_id), _job_id=arq_id, _queue_name=queue)


async def statuses(sessions: Sessions, table: str, ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
    async with sessions() as session:
        found = {
            row[0]: tuple(row[1:])
            for row in await session.execute(
                text(f"SELECT id, status, started_at, finished_at FROM {table} WHERE id = ANY(:i)"),
                {"i": ids},
            )
        }
    return [found[i] for i in ids]


def in_order(rows: list[tuple[Any, ...]]) -> bool:
    """Each (status, started_at, finished_at) completed, and started after the one before ended."""
    return all(r[0] == "completed" for r in rows) and all(
        before[2] <= after[1] for before, after in itertools.pairwise(rows)
    )


async def test_waiting_uses_up_no_tries(
    settings: Settings,
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    user = await new_user(sessions)
    await hold(arq_redis, sessions, "import", user)
    ids = [await new_import(jobs_client, user) for _ in range(5)]
    arq_ids = [import_job_id(i) for i in ids]
    # MAX_RETRIES=0: arq allows two tries (worker.retry.arq_max_tries), the wrapper one.
    # A future, not a task: RunBurst is typed as returning an awaitable.
    worker: asyncio.Future[Worker] = asyncio.ensure_future(
        run_burst(
            "imports",
            jobs=[process_contacts_import, hold_turn],
            settings_=settings_with(settings, max_retries=0),
        )
    )
    try:
        await wait_for(functools.partial(parked, redis_raw, "imports", arq_ids), 20, "parked")
        for _ in range(3):
            # Each parked job comes round again (its recheck, or a wake that lost the race).
            now_ms = int(time.time() * 1000)
            await redis_raw.zadd("imports", dict.fromkeys(arq_ids, now_ms), xx=True)
            await wait_for(functools.partial(parked, redis_raw, "imports", arq_ids), 20, "parked")
        assert [row[0] for row in await import_times(sessions, ids)] == ["pending"] * 5
        await reply(redis_raw.rpush(RELEASE_KEY, b"1"))
        await asyncio.wait_for(worker, 60)
    finally:
        worker.cancel()
    assert in_order(await statuses(sessions, "contact_import_jobs", ids))


async def test_exports_share_by_their_own_cap_and_other_users_pass(
    settings: Settings,
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    a, b = await new_user(sessions), await new_user(sessions)
    await hold(arq_redis, sessions, "export", a)
    waiting_ids = [(await jobs_client.export_contacts(a)).id for _ in range(2)]
    passing = (await jobs_client.export_contacts(b)).id
    worker: asyncio.Future[Worker] = asyncio.ensure_future(
        run_burst(
            "exports",
            jobs=[generate_contact_export, hold_turn],
            # Imports may run four at once: the exports' own cap is the one that counts.
            settings_=settings_with(settings, import_max_running_per_user=4),
        )
    )

    async def b_done_a_parked() -> bool:
        ((status, _, _),) = await statuses(sessions, "exports", [passing])
        arq_ids = [export_job_id(i) for i in waiting_ids]
        return status == "completed" and await parked(redis_raw, "exports", arq_ids)

    try:
        await wait_for(b_done_a_parked, 20, "B's export done while A's two wait")
        assert [r[0] for r in await statuses(sessions, "exports", waiting_ids)] == ["pending"] * 2
        await reply(redis_raw.rpush(RELEASE_KEY, b"1"))
        await asyncio.wait_for(worker, 60)
    finally:
        worker.cancel()
    assert in_order(await statuses(sessions, "exports", waiting_ids))


async def test_a_parked_import_survives_redis_losing_its_data(
    open_ctx: CtxOpener,
    jobs_client: JobsClient,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    user = await new_user(sessions)
    ids = [await new_import(jobs_client, user) for _ in range(2)]
    ctx = await open_ctx("imports")
    claims = []
    for import_id in ids:
        ctx["job_id"] = import_job_id(import_id)
        await picked_up(redis_raw, ctx["job_id"])
        claims.append(await fairness.claim(ctx))
    assert [c.admitted for c in claims if c is not None] == [True, False]
    expected = [
        Expected(import_job_id(i), PROCESS_CONTACTS_IMPORT, {"job_id": str(i)}) for i in ids
    ]
    # Parked far ahead, it is still a job Redis knows: the reconciler adds no second one.
    assert await forgotten(ctx["redis"], expected) == []

    await redis_raw.flushdb()
    await redis_raw.set(REDIS_OWNER_KEY, "1")
    async with sessions.begin() as session:  # past the reconciler's minimum age
        await session.execute(
            text("UPDATE contact_import_jobs SET created_at = created_at - interval '5 minutes'")
        )
    default_ctx = await open_ctx("default")
    assert (await reconcile_jobs.run(default_ctx))["enqueued"] == 2
    await run_burst("imports")
    assert in_order(await statuses(sessions, "contact_import_jobs", ids))

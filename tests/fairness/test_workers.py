"""Fair sharing through real imports worker processes: one user's burst no longer holds every
slot, a user's imports run in their enqueue order, at most their cap at a time across all the
workers, and a SIGKILLed worker does not stall its user's queue. Order is read from the rows'
timestamps (each import's `started_at` and `finished_at`), never from how long anything took."""

from __future__ import annotations

import functools
import json
import os
import signal
import uuid
from datetime import datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.fairness.conftest import import_times, new_import, parked
from tests.reliability.conftest import Processes, wait_for, worker_env, worker_ready
from tests.support.redis_replies import reply
from tests.support.users import new_user
from worker.client import JobsClient
from worker.lease import running_key
from worker.routes import import_job_id
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
Sessions = async_sessionmaker[AsyncSession]
BIG_ROWS = 40_000
SMALL_ROWS = 200


def imports_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    return worker_env(
        settings,
        c360_job_modules="jobs.imports",
        import_dir=settings.import_dir,
        import_batch_rows=2_000,
        **overrides,
    )


async def start_workers(
    processes: Processes, redis: aioredis.Redis, count: int, env: dict[str, str]
) -> list[int]:
    pids = [processes.start("work", "imports", env=env).pid for _ in range(count)]
    for pid in pids:
        await wait_for(functools.partial(worker_ready, redis, "imports", pid), 20, "the workers")
    return pids


async def all_done(sessions: Sessions, ids: list[uuid.UUID]) -> list[tuple[Any, ...]] | None:
    rows = await import_times(sessions, ids)
    return rows if all(status == "completed" for status, _, _ in rows) else None


def most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The largest number of the (start, end) spans that overlap at one moment."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


async def test_a_small_import_of_another_user_passes_a_burst(
    settings: Settings,
    processes: Processes,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    jobs_client: JobsClient,
) -> None:
    await start_workers(processes, redis_raw, 1, imports_env(settings))  # 2 imports slots
    a, b = await new_user(sessions), await new_user(sessions)
    bursts = [await new_import(jobs_client, a, BIG_ROWS) for _ in range(3)]
    small = await new_import(jobs_client, b, SMALL_ROWS)
    rows = await wait_for(functools.partial(all_done, sessions, [*bursts, small]), 90, "imports")
    (_, first_end), (second_start, second_end), (third_start, _) = [r[1:] for r in rows[:3]]
    small_end = rows[3][2]
    # B's import took the second slot while A's waited for A's first to end.
    assert small_end < second_end
    assert first_end <= second_start and second_end <= third_start


@pytest.mark.parametrize("cap", [1, 2])
async def test_one_users_imports_run_in_order_at_most_cap_at_once_across_workers(
    cap: int,
    settings: Settings,
    processes: Processes,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    jobs_client: JobsClient,
) -> None:
    env = imports_env(settings, import_max_running_per_user=cap)
    await start_workers(processes, redis_raw, 2, env)  # 4 imports slots between two processes
    user = await new_user(sessions)
    ids = [await new_import(jobs_client, user, BIG_ROWS // 2) for _ in range(4)]
    rows = await wait_for(functools.partial(all_done, sessions, ids), 90, "the imports")
    spans = [(start, end) for _, start, end in rows]
    assert most_at_once(spans) == cap
    for index, (start, _) in enumerate(spans):
        # The n-th import starts only once all but `cap - 1` of the imports before it ended.
        ended_before = sum(1 for _, end in spans[:index] if end <= start)
        assert ended_before >= index - cap + 1, (index, spans)


async def test_a_sigkilled_worker_does_not_hold_its_users_next_import(
    settings: Settings,
    processes: Processes,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    jobs_client: JobsClient,
) -> None:
    env = imports_env(settings)
    (victim,) = await start_workers(processes, redis_raw, 1, env)
    user = await new_user(sessions)
    first = await new_import(jobs_client, user, BIG_ROWS * 3)
    second = await new_import(jobs_client, user, SMALL_ROWS)

    async def first_half_way_second_parked() -> bool:
        (status, _, _), _ = await import_times(sessions, [first, second])
        entry = await reply(redis_raw.hget(running_key("imports"), import_job_id(first)))
        return (
            status == "processing"
            and entry is not None
            and await parked(redis_raw, "imports", [import_job_id(second)])
        )

    await wait_for(first_half_way_second_parked, 60, "the first import running, the second parked")
    entry = await reply(redis_raw.hget(running_key("imports"), import_job_id(first)))
    assert entry is not None and json.loads(entry)["worker"].endswith(f":{victim}")
    os.killpg(victim, signal.SIGKILL)
    # A fresh worker (the supervisor's restart) takes the killed import up when its lease runs
    # out; it finishes, and the user's next import runs after it.
    await start_workers(processes, redis_raw, 1, env)
    rows = await wait_for(functools.partial(all_done, sessions, [first, second]), 90, "both")
    (_, _, first_end), (_, second_start, _) = rows
    assert first_end <= second_start

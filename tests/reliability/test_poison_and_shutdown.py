"""Poison pills are failed with their reason; SIGTERM drains, then cancels and requeues."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, retry_key_prefix

from tests.reliability.conftest import (
    Db,
    Processes,
    wait_for,
    worker_env,
    worker_pids,
    worker_ready,
)
from tests.support.redis_replies import reply
from worker.main import QUEUE_CONFIGS
from worker.settings import Settings
from worker.stats import FAILURES_KEY, stats_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def test_a_job_that_kills_its_worker_is_failed_with_the_reason_after_the_retries(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, redis_raw: aioredis.Redis, db: Db
) -> None:
    # MAX_RETRIES=1: two tries die (each freed by its lease), the third is failed by our code.
    env = worker_env(settings, max_retries=1)
    supervisor = processes.start("run", "--queue", "default", env=env)
    await arq_redis.enqueue_job(
        "kill_own_worker", key="pill", _job_id="pill", _queue_name="default"
    )

    failures = await wait_for(
        lambda: db.rows("SELECT message FROM rel_failures WHERE key = 'pill'"),
        50,
        "the poison pill to be recorded as failed",
    )
    assert failures[0][0] == (
        "the worker died 2 times while running this job (killed or out of memory); not trying again"
    )
    assert [r[0] for r in await db.runs("pill")] == [1, 2]  # the third try never ran it
    assert supervisor.poll() is None, "the supervisor must survive its children's deaths"
    counts = await reply(redis_raw.hgetall(stats_key("default")))
    assert (counts[b"died"], counts[b"failed"]) == (b"2", b"1")
    recent = json.loads((await reply(redis_raw.lrange(FAILURES_KEY, 0, 0)))[0])
    assert (recent["job_id"], recent["try"]) == ("pill", 3)
    assert "died 2 times" in recent["error"]
    # The replacement worker keeps serving.
    await arq_redis.enqueue_job("record", key="after", _queue_name="default")
    await wait_for(db.done, 10, "a normal job after the poison pill")


async def test_sigterm_lets_a_running_job_finish_and_run_exits(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, db: Db
) -> None:
    supervisor = processes.start("run", "--queue", "default", env=worker_env(settings))
    await arq_redis.enqueue_job("record", key="short", first_run_sleep_s=3, _queue_name="default")
    await wait_for(lambda: db.runs("short"), 20, "the job to start")
    supervisor.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert await processes.wait_exit(supervisor, 15) == 0
    assert time.monotonic() - stopped_at < QUEUE_CONFIGS["default"].shutdown_grace_s
    assert await db.done() == {"short"}
    assert len(await db.runs("short")) == 1


async def test_sigterm_past_the_grace_cancels_and_requeues_without_using_a_try(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, redis_raw: aioredis.Redis, db: Db
) -> None:
    env = worker_env(settings)
    supervisor = processes.start("run", "--queue", "default", env=env)
    await arq_redis.enqueue_job(
        "record", key="long", first_run_sleep_s=600, _job_id="long", _queue_name="default"
    )
    await wait_for(lambda: db.runs("long"), 20, "the job to start")
    supervisor.send_signal(signal.SIGTERM)
    grace_s = QUEUE_CONFIGS["default"].shutdown_grace_s
    assert await processes.wait_exit(supervisor, grace_s + 10) == 0
    # Back in the queue, unclaimed, and the cancelled try was given back.
    assert await redis_raw.zscore("default", "long") is not None
    assert not await redis_raw.exists(in_progress_key_prefix + "long")
    assert await redis_raw.get(retry_key_prefix + "long") == b"0"
    assert await db.done() == set()

    burst = processes.start("work", "default", "--burst", env=env)
    assert await processes.wait_exit(burst, 20) == 0, processes.log(burst)
    assert await db.done() == {"long"}
    # The re-run is try 1 again: it started from scratch, not as a retry.
    assert [r[0] for r in await db.runs("long")] == [1, 1]


async def test_the_supervisor_replaces_a_worker_that_was_killed(
    settings: Settings, processes: Processes, redis_raw: aioredis.Redis
) -> None:
    supervisor = processes.start("run", "--queue", "default", env=worker_env(settings))

    async def one_worker() -> set[int]:
        pids = await worker_pids(redis_raw, "default")
        return pids if len(pids) == 1 else set()

    (first,) = await wait_for(one_worker, 20, "the first worker")
    os.kill(first, signal.SIGKILL)
    await redis_raw.delete(*[k async for k in redis_raw.scan_iter(match=f"default:*:{first}")])

    async def replaced() -> bool:
        pids = await one_worker()
        return (
            bool(pids)
            and first not in pids
            and await worker_ready(redis_raw, "default", next(iter(pids)))
        )

    await wait_for(replaced, 20, "a replacement worker")
    assert supervisor.poll() is None

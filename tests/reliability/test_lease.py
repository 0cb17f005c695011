"""Short renewed leases: a SIGKILLed worker's job runs again on another worker within 30 s."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from tests.conftest import RunBurst
from tests.reliability.conftest import Db, Processes, wait_for, worker_env, worker_ready
from tests.support.redis_replies import reply
from worker.context import Ctx
from worker.job import job
from worker.lease import LEASE_MS, WORKER_SEEN_WINDOW_MS, WORKERS_KEY, Leases, running_key
from worker.observe import redis_status
from worker.settings import Settings


@job()
async def probe_lease(ctx: Ctx) -> dict[str, Any]:
    redis = ctx["redis"]
    entry = await reply(redis.hget(running_key("default"), ctx["job_id"]))
    assert entry is not None, "a running job's lease is mirrored for status"
    return {
        "pttl_ms": await redis.pttl(in_progress_key_prefix + ctx["job_id"]),
        "entry": json.loads(entry),
    }


async def test_a_running_job_holds_a_short_lease_mirrored_for_status(
    arq_redis: ArqRedis, run_burst: RunBurst, redis_raw: aioredis.Redis
) -> None:
    job_ = await arq_redis.enqueue_job("probe_lease", _job_id="probe-1", _queue_name="default")
    assert job_ is not None
    # A worker built by arq from our settings claims for job_timeout + 10 s (about 100 s
    # here); the on_job_start hook must have cut that to the lease before the job ran.
    await run_burst("default", jobs=[probe_lease])
    seen = await job_.result(timeout=1)
    assert LEASE_MS - 2000 < seen["pttl_ms"] <= LEASE_MS
    assert seen["entry"]["worker"].endswith(f":{os.getpid()}")
    assert seen["entry"]["lease_until_ms"] > time.time() * 1000
    # Finished: the mirror entry is gone and arq deleted the in-progress key.
    assert await reply(redis_raw.hlen(running_key("default"))) == 0
    assert not await redis_raw.exists(in_progress_key_prefix + "probe-1")


async def test_renewal_extends_leases_but_never_shortens_a_cron_keep_or_revives_a_key(
    arq_redis: ArqRedis, redis_raw: aioredis.Redis
) -> None:
    leases = Leases(arq_redis, "default")
    for job_id in ("running", "cron-finished", "finished"):
        await redis_raw.set(in_progress_key_prefix + job_id, b"1", px=3000)
        await leases.acquire(job_id)
    await redis_raw.pexpire(in_progress_key_prefix + "running", 1000)
    # arq's finish_job: a cron job's key is kept 60 s; a plain job's key is deleted.
    await redis_raw.pexpire(in_progress_key_prefix + "cron-finished", 60_000)
    await redis_raw.delete(in_progress_key_prefix + "finished")
    assert await leases.renew() == 3
    assert await redis_raw.pttl(in_progress_key_prefix + "running") > LEASE_MS - 1000
    assert await redis_raw.pttl(in_progress_key_prefix + "cron-finished") > LEASE_MS + 30_000
    assert not await redis_raw.exists(in_progress_key_prefix + "finished")
    await leases.release("running")
    assert await leases.renew() == 2
    assert sorted(await reply(redis_raw.hkeys(running_key("default")))) == [
        b"cron-finished",
        b"finished",
    ]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_sigkilled_workers_job_runs_again_elsewhere_within_30_s(
    settings: Settings,
    processes: Processes,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    db: Db,
) -> None:
    env = worker_env(settings)  # JOB_TIMEOUT_S=1800: stock arq would wait 1840 s
    first = processes.start("work", "default", env=env)
    await arq_redis.enqueue_job(
        "record", key="k", first_run_sleep_s=600, _job_id="victim", _queue_name="default"
    )
    await wait_for(lambda: db.runs("k"), 20, "the first worker to start the job")
    second = processes.start("work", "default", env=env)
    await wait_for(lambda: worker_ready(redis_raw, "default", second.pid), 20, "worker 2")

    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    runs = await wait_for(
        lambda: _rerun(db), 30, "the job to run again within 30 s of the kill", every_s=0.05
    )
    recovered_s = time.monotonic() - killed_at
    assert recovered_s < 30
    assert [(r[0], r[1]) for r in runs] == [(1, first.pid), (2, second.pid)]
    await wait_for(db.done, 10, "the re-run to finish")
    assert await db.done() == {"k"}
    assert await redis_raw.zcard("default") == 0


async def _rerun(db: Db) -> list[Any]:
    runs = await db.runs("k")
    if len(runs) < 2:
        return []
    return runs


async def test_workers_list_themselves_for_status_and_drop_processes_gone_silent(
    settings: Settings, processes: Processes, redis_raw: aioredis.Redis
) -> None:
    """status finds workers in `c360:workers`, not by SCAN: a process adds itself at start
    (dropping entries nobody refreshed within the window) and removes itself on a clean stop."""
    now_ms = int(time.time() * 1000)
    killed = "default:health-check:gone-host:1"
    await redis_raw.zadd(WORKERS_KEY, {killed: now_ms - 2 * WORKER_SEEN_WINDOW_MS})
    worker = processes.start("work", "default", env=worker_env(settings))
    await wait_for(lambda: worker_ready(redis_raw, "default", worker.pid), 20, "the worker")

    registered = {key.decode() for key in await redis_raw.zrange(WORKERS_KEY, 0, -1)}
    own = f"default:health-check:{socket.gethostname()}:{worker.pid}"
    assert registered == {own}
    status = await redis_status(redis_raw, int(time.time() * 1000))
    assert [w["worker"] for w in status["queues"]["default"]["workers"]] == [
        f"{socket.gethostname()}:{worker.pid}"
    ]

    worker.send_signal(signal.SIGTERM)
    assert await processes.wait_exit(worker, 30) == 0
    assert await redis_raw.zrange(WORKERS_KEY, 0, -1) == []

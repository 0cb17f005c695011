"""`python -m worker status`: counts from Redis (100,000 queued jobs), progress from PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.reliability.conftest import REPO_ROOT, free_port
from tests.support.heartbeats import fake_heartbeat
from tests.support.redis_replies import reply
from worker.context import Ctx
from worker.errors import TransientError
from worker.job import job
from worker.lease import running_key
from worker.observe import collect
from worker.settings import Settings
from worker.stats import FAILURES_KEY, stats_key

QUEUED = 100_000
DEFERRED = 500
HEARTBEAT = ("default:health-check:hostx:4242", b"Nov-26 j_complete=7 queued=1")


async def _fill(redis_raw: aioredis.Redis) -> None:
    now_ms = int(time.time() * 1000)
    # Queue entries only: counts never read the job payloads, so those are not needed here.
    async with redis_raw.pipeline(transaction=False) as pipe:
        for start in range(0, QUEUED, 10_000):
            pipe.zadd("default", {f"q{n}": now_ms - n for n in range(start, start + 10_000)})
        pipe.zadd("imports", {f"d{n}": now_ms + 60_000 + n for n in range(DEFERRED)})
        pipe.zadd("imports", {"due": now_ms - 5})
        pipe.hset(
            running_key("exports"),
            mapping={
                "export:live": json.dumps(
                    {"worker": "h:1", "started_ms": now_ms, "lease_until_ms": now_ms + 9000}
                ),
                "export:dead": json.dumps(
                    {"worker": "h:2", "started_ms": now_ms, "lease_until_ms": now_ms - 1}
                ),
            },
        )
        pipe.hset(stats_key("default"), mapping={"completed": 7, "failed": 2, "retried": 3})
        failure = {"at_s": 1.0, "queue": "default", "job_id": "j1", "job": "send_email"}
        pipe.lpush(FAILURES_KEY, json.dumps({**failure, "try": 4, "error": "boom"}))
        await pipe.execute()
    await fake_heartbeat(redis_raw, *HEARTBEAT, ttl_ms=8000)


async def test_status_counts_with_100000_queued_jobs(
    settings: Settings,
    redis_raw: aioredis.Redis,
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
) -> None:
    await _fill(redis_raw)
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO contact_import_jobs (user_id, file_path, status, total_rows,"
                " processed_rows, started_at) VALUES (:u, 'x.csv', 'processing', 200, 50, now())"
            ),
            {"u": user_id},
        )
    status = await collect(settings)
    queues = status["queues"]
    assert (queues["default"]["queued"], queues["default"]["deferred"]) == (QUEUED, 0)
    assert (queues["imports"]["queued"], queues["imports"]["deferred"]) == (1, DEFERRED)
    assert queues["exports"]["running"] == 1
    assert queues["exports"]["running_jobs"][0]["job_id"] == "export:live"
    assert queues["default"]["counts"] == {"completed": 7, "failed": 2, "retried": 3, "died": 0}
    (worker,) = queues["default"]["workers"]
    assert worker["worker"] == "hostx:4242"
    assert 2.0 <= worker["last_heartbeat_s_ago"] <= 4.0  # arq's TTL is interval + 1 = 11 s
    assert status["recent_failures"][0]["error"] == "boom"
    (running_import,) = status["imports"]
    assert (running_import["processed_rows"], running_import["percent"]) == (50, 25.0)

    env = {**os.environ, "DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}
    # The heartbeat lives 8 s; on a loaded machine the checks above can take that long, and
    # the CLI must still find the worker alive.
    await fake_heartbeat(redis_raw, *HEARTBEAT, ttl_ms=8000)
    as_json = await _status_cli(env, "--json")
    assert json.loads(as_json)["queues"]["default"]["queued"] == QUEUED
    table = await _status_cli(env)
    assert "100000" in table and "hostx:4242" in table


async def _status_cli(env: dict[str, str], *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "status", *args,
        env={**env, "COLUMNS": "200"}, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def test_status_without_redis_prints_one_line_and_fails(settings: Settings) -> None:
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "status", "--json"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: cannot read Redis at 127.0.0.1:")


@job()
async def succeeds(ctx: Ctx) -> str:
    return "ok"


@job()
async def fails(ctx: Ctx) -> None:
    raise ValueError("the input is wrong")


@job()
async def flaky(ctx: Ctx) -> str:
    if ctx.get("job_try", 1) == 1:
        raise TransientError("try again")
    return "ok"


async def test_the_job_wrapper_counts_outcomes_and_keeps_failures(
    arq_redis: ArqRedis, redis_raw: aioredis.Redis, run_burst: RunBurst
) -> None:
    for name in ("succeeds", "fails", "flaky"):
        await arq_redis.enqueue_job(name, _job_id=name, _queue_name="default")
    await run_burst("default", jobs=[succeeds, fails, flaky])
    counts = await reply(redis_raw.hgetall(stats_key("default")))
    assert counts == {b"completed": b"2", b"failed": b"1", b"retried": b"1"}
    (failure,) = [json.loads(raw) for raw in await reply(redis_raw.lrange(FAILURES_KEY, 0, -1))]
    assert (failure["job_id"], failure["job"], failure["try"]) == ("fails", "fails", 1)
    assert failure["error"] == "ValueError: the input is wrong"
    # Finished jobs leave no death-count key behind.
    assert [k async for k in redis_raw.scan_iter(match="c360:unfinished:*")] == []

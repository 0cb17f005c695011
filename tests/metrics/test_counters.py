"""Recycles and rate-limit pauses, counted in Redis where they happen and read back from `/metrics`.

A recycle is a real worker process reaching WORKER_MAX_JOBS_PER_PROCESS; a 429 pause is a real
send job told 429 by the loopback provider. The exposition is parsed with prometheus-client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.marketing.sync import RATE_LIMIT_KEY_PREFIX as MARKETING_PREFIX
from tests.conftest import RunBurst
from tests.email.conftest import RECIPIENT
from tests.email.test_send_jobs import HTML, SUBJECT
from tests.metrics.test_metrics import samples, value
from tests.reliability.conftest import Processes, worker_env
from tests.support.provider_server import RESEND_EMAILS, Answer, ProviderServer
from worker.client import JobsClient
from worker.metrics import render_metrics
from worker.ratelimit import RateLimiter
from worker.routes import QUEUES
from worker.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


async def test_a_worker_process_that_recycles_is_counted_once_for_its_queue(
    settings: Settings,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    processes: Processes,
) -> None:
    env = worker_env(
        settings, c360_job_modules="tests.metrics.metric_jobs", worker_max_jobs_per_process=1
    )
    # Two jobs: the process may take both at once; it still recycles (and counts) once.
    for _ in range(2):
        await arq_redis.enqueue_job("nap", 0.05, _queue_name="default")
    worker = processes.start("work", "default", env=env)
    assert await processes.wait_exit(worker, 60) == 0, processes.log(worker)
    assert "recycling this worker: ran 1 jobs" in processes.log(worker)

    found = samples(await render_metrics(redis_raw, sessions))
    for queue in QUEUES:
        expected = 1 if queue == "default" else 0
        assert value(found, "c360_worker_recycles_total", queue=queue) == expected, queue


async def test_a_429_from_the_provider_counts_one_pause(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
) -> None:
    provider_server.script(RESEND_EMAILS, Answer(status=429, headers={"retry-after": "1"}))
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, idempotency_key="k-429")
    await run_burst("default", settings_=job_settings("resend"))
    assert len(provider_server.delivered) == 1  # the retry after the pause went through

    found = samples(await render_metrics(redis_raw, sessions))
    pauses = {
        (limiter, reason): value(
            found, "c360_rate_limit_pauses_total", limiter=limiter, reason=reason
        )
        for limiter in ("email", "marketing")
        for reason in ("rate_limited", "halted")
    }
    assert pauses == {
        ("email", "rate_limited"): 1,
        ("email", "halted"): 0,
        ("marketing", "rate_limited"): 0,
        ("marketing", "halted"): 0,
    }


async def test_pauses_that_overlap_count_once_and_a_halt_counts_as_halted(
    redis_raw: aioredis.Redis, sessions: Sessions
) -> None:
    limiter = RateLimiter(redis_raw, 1.0, key_prefix=MARKETING_PREFIX)
    # Ten workers told 429 at once: one pause, extended, not ten.
    await asyncio.gather(*(limiter.pause_for(600 + n) for n in range(10)))
    await limiter.resume()
    await limiter.pause_until(0)  # a deadline already past starts nothing
    await limiter.pause_for(600)  # the earlier pause was lifted: this one is a new one
    assert await limiter.halt(600, "key refused")
    assert not await limiter.halt(600, "key refused")  # already halted: not a new halt
    assert await limiter.pauses() == {"rate_limited": 2, "halted": 1}

    found = samples(await render_metrics(redis_raw, sessions))
    labels = {"limiter": "marketing"}
    assert value(found, "c360_rate_limit_pauses_total", **labels, reason="rate_limited") == 2
    assert value(found, "c360_rate_limit_pauses_total", **labels, reason="halted") == 1
    assert value(found, "c360_rate_limit_pauses_total", limiter="email", reason="halted") == 0

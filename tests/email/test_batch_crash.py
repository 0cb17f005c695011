"""SIGKILL a worker in the middle of a 5,000-email campaign through the fake Resend: after a
restart every email is delivered exactly once and no row is left `sending` or `pending`."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.reliability.conftest import Processes, wait_for, worker_env, worker_ready
from tests.support.provider_server import RESEND_BATCH, ProviderServer
from worker.settings import Settings

from .conftest import APP_URL, SECRET_KEY
from .test_batch_send import add_due_entries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

EMAILS = 5000
RATE_PER_S = 10  # 50 batches of 100: several seconds of sending, room to kill in the middle


@pytest.fixture
def resend() -> Iterator[ProviderServer]:
    # 300 ms an answer: a page's two batches are nearly always in flight when the kill comes.
    with ProviderServer(default_delay_s=0.3) as server:
        server.rate_limit_per_s = RATE_PER_S  # our limiter must keep under it: no 429s
        yield server


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


async def count(sessions: async_sessionmaker[AsyncSession], sql: str) -> int:
    async with sessions() as session:
        return int(await session.scalar(text(sql)) or 0)


async def test_sigkill_mid_campaign_delivers_every_email_exactly_once(
    settings: Settings,
    processes: Processes,
    arq_redis: ArqRedis,
    sessions: async_sessionmaker[AsyncSession],
    resend: ProviderServer,
) -> None:
    redis_raw = aioredis.Redis.from_url(settings.redis_url)
    await add_due_entries(sessions, EMAILS)
    env = worker_env(
        settings,
        c360_job_modules="jobs.email",
        email_provider="resend",
        email_api_key="re_test_batch_crash_key",
        email_api_base_url=resend.base_url,
        email_rate_limit_per_s=RATE_PER_S,
        app_url=APP_URL,
        secret_key=SECRET_KEY,
    )
    try:
        first = processes.start("work", "default", env=env)
        await wait_for(lambda: worker_ready(redis_raw, "default", first.pid), 20, "worker 1")
        await arq_redis.enqueue_job(
            "send_waitlist_campaign_hourly", _queue_name="default", _job_id="tick-1"
        )

        async def a_third_delivered() -> bool:
            return len(resend.delivered) >= EMAILS // 3

        await wait_for(a_third_delivered, 60, "a third of the campaign", every_s=0.02)
        os.kill(first.pid, signal.SIGKILL)
        at_kill = len(resend.delivered)
        sending = await count(
            sessions, "SELECT count(*) FROM email_messages WHERE status = 'sending'"
        )
        assert at_kill < EMAILS and sending > 0  # killed mid-campaign, with batches in flight
        second = processes.start("work", "default", env=env)
        await wait_for(lambda: worker_ready(redis_raw, "default", second.pid), 20, "worker 2")

        # The killed tick runs again once its lease frees it (15 s); a claim found mid-send
        # while the dead worker's heartbeat still looked fresh waits for a later tick, so
        # ticks keep coming (as the hourly cron would) until nothing is left.
        ticks = 1

        async def campaign_done() -> bool:
            nonlocal ticks
            done = await count(
                sessions, "SELECT count(*) FROM waitlist_entries WHERE campaign_step = 2"
            )
            if done == EMAILS:
                return True
            current = (f"arq:job:tick-{ticks}", f"arq:in-progress:tick-{ticks}")
            if not await arq_redis.exists(*current):
                ticks += 1
                await arq_redis.enqueue_job(
                    "send_waitlist_campaign_hourly", _queue_name="default", _job_id=f"tick-{ticks}"
                )
            return False

        await wait_for(campaign_done, 100, "every campaign step to settle", every_s=1.0)
    finally:
        await redis_raw.aclose()

    # The fake's records: every recipient delivered once, whatever was requested twice.
    delivered = Counter(d.json["to"][0] for d in resend.delivered)
    assert len(delivered) == EMAILS and set(delivered.values()) == {1}
    statuses = Counter(s for (s,) in await _rows(sessions, "SELECT status FROM email_messages"))
    assert statuses == {"sent": EMAILS}  # none left `sending` or `pending`
    # The batches the kill left mid-send went again, under their first key.
    requested = Counter(r.headers["Idempotency-Key"] for r in resend.requests_to(RESEND_BATCH))
    assert any(n > 1 for n in requested.values())
    assert resend.rate_limited == 0  # the shared limiter kept every process under the rate
    assert second.poll() is None
    print(
        f"\nkilled after {at_kill} deliveries with {sending} rows mid-send; "
        f"{sum(n > 1 for n in requested.values())} batches requested again; {ticks} ticks"
    )


async def _rows(sessions: async_sessionmaker[AsyncSession], sql: str) -> list[tuple[str]]:
    async with sessions() as session:
        return [tuple(row) for row in (await session.execute(text(sql))).all()]

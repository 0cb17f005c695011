"""SIGKILL during a burst of sends through the fake Resend: every email delivered exactly once."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.reliability.conftest import Db, Processes, wait_for, worker_env, worker_ready
from tests.support.provider_server import RESEND_BATCH, RESEND_EMAILS, ProviderServer
from worker.client import JobsClient
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

EMAILS = 300
RATE_PER_S = 50  # 300 sends take ~6 s: long enough to kill the worker in the middle


@pytest.fixture
def resend() -> Iterator[ProviderServer]:
    with ProviderServer(default_delay_s=0.08) as server:
        yield server


def email_env(settings: Settings, server: ProviderServer) -> dict[str, str]:
    return worker_env(
        settings,
        # The real send jobs, with production's 120 s claim lease (jobs/email/outbox.py).
        c360_job_modules="jobs.email",
        email_provider="resend",
        email_api_key="re_test_faults_key",
        email_api_base_url=server.base_url,
        email_rate_limit_per_s=RATE_PER_S,
    )


async def test_sigkill_mid_burst_delivers_every_email_exactly_once(
    settings: Settings,
    processes: Processes,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: async_sessionmaker[AsyncSession],
    resend: ProviderServer,
    db: Db,
) -> None:
    env = email_env(settings, resend)
    first = processes.start("work", "default", env=env)
    await wait_for(lambda: worker_ready(redis_raw, "default", first.pid), 20, "worker 1")
    client = JobsClient(redis=arq_redis, sessions=sessions, settings=settings)
    keys = [f"burst-{n:03}" for n in range(EMAILS)]
    for key in keys:
        await client.send_email(f"{key}@example.com", key, f"<p>{key}</p>", idempotency_key=key)

    async def a_third_delivered() -> bool:
        return len(resend.delivered) >= EMAILS // 3

    await wait_for(a_third_delivered, 30, "a third of the burst", every_s=0.02)
    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    at_kill = len(resend.delivered)
    in_flight = await db.scalar("SELECT count(*) FROM email_messages WHERE status = 'sending'")
    second = processes.start("work", "default", env=env)

    async def all_settled() -> bool:
        settled = await db.scalar(
            "SELECT count(*) FROM email_messages WHERE status IN ('sent', 'failed', 'review')"
        )
        return int(settled) == EMAILS

    await wait_for(all_settled, 70, "every outbox row to settle", every_s=0.2)
    settled_s = time.monotonic() - killed_at
    # The job leases free the dead worker's jobs within 15 s, and a claim whose job is gone is
    # taken over at once rather than after its 120 s lease.
    assert settled_s < 30

    # Delivered exactly once each, whatever was requested twice.
    delivered = Counter(d.json["subject"] for d in resend.delivered)
    assert delivered == Counter(keys)
    # Each request's key: a lone email's own (the caller's namespace), or its batch's.
    requests = [r for r in resend.requests if r.path in (RESEND_EMAILS, RESEND_BATCH)]
    requested = Counter(r.headers["Idempotency-Key"] for r in requests)
    alone = {r.headers["Idempotency-Key"] for r in requests if r.path == RESEND_EMAILS}
    assert alone <= {f"caller/{key}" for key in keys}
    assert all(k.startswith("batch/") for k in requested if k not in alone)
    emails = [e for r in requests for e in (r.json if r.path == RESEND_BATCH else [r.json])]
    assert {e["subject"] for e in emails} == set(keys)  # every email was asked for
    # Every row sent, with the id the provider gave its one delivery.
    ids = {d.json["subject"]: d.provider_id for d in resend.delivered}
    rows = await db.rows(
        "SELECT idempotency_key, status, provider_message_id, attempts FROM email_messages"
    )
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (f"caller/{k}", "sent", ids[k]) for k in keys
    )
    # The kill left claims mid-send: those were sent again, under their first key.
    resent = {r[0] for r in rows if r[3] > 1}
    assert in_flight > 0 and len(resent) >= in_flight
    assert second.poll() is None
    print(
        f"\nkilled after {at_kill} deliveries with {in_flight} claims mid-send; "
        f"{len(resent)} resent, {sum(n > 1 for n in requested.values())} requests made twice; "
        f"all {EMAILS} sent {settled_s:.1f} s after the kill"
    )

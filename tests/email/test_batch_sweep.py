"""A burst drains at the provider's rate, not arq's: flushes sweep due one-off rows into their
batch; and a claim that gets no send slot in time is given back, nothing sent or counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import jobs.email.batcher
from jobs.email.outbox import Draft, deliver
from tests.conftest import RunBurst
from tests.support.provider_server import ProviderServer
from worker.client import JobsClient
from worker.context import Ctx
from worker.errors import TransientError
from worker.ratelimit import RateLimiter
from worker.settings import Settings

from .conftest import outbox_rows

BURST = 300
# Far fewer running jobs than emails: without the sweep, each request could only carry the
# emails of the jobs running at that moment.
RUNNING_JOBS = 3


async def test_a_burst_with_few_running_jobs_goes_out_in_full_batches_each_once(
    arq_redis: ArqRedis,
    client_of: Callable[..., JobsClient],
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    jobs = client_of()
    for n in range(BURST):
        await jobs.send_email(f"w{n}@example.com", f"w{n}", "<p>hi</p>", idempotency_key=f"w{n}")

    worker = await run_burst(
        "default",
        settings_=job_settings("resend", email_rate_limit_per_s=5.0),
        max_jobs=RUNNING_JOBS,
    )

    assert (worker.jobs_complete, worker.jobs_failed) == (BURST, 0)
    # ~BURST / 100 requests (one per 100 emails), not one per handful of running jobs.
    assert len(provider_server.requests) <= BURST // 100 + 2
    assert Counter(d.json["subject"] for d in provider_server.delivered) == Counter(
        f"w{n}" for n in range(BURST)
    )
    rows = await outbox_rows(sessions)
    assert {(r.status, r.attempts) for r in rows} == {("sent", 1)}
    ids = {r.idempotency_key: r.provider_message_id for r in rows}
    results: list[Any] = [r.result for r in await arq_redis.all_job_results()]
    assert len(results) == BURST
    # Most rows were swept into another job's batch: their own jobs found them settled and
    # returned at once, reporting the id the batch got, with nothing sent by them.
    swept = [r for r in results if r["duplicate"]]
    assert len(swept) >= BURST - BURST // 10
    assert all(r["status"] == "sent" for r in results)
    assert all(r["provider_message_id"] == ids[r["key"]] for r in results)


async def test_a_swept_row_whose_job_is_waiting_gets_the_batch_answer(
    job_ctx: Callable[..., Awaitable[Ctx]],
    client_of: Callable[..., JobsClient],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    jobs = client_of()
    await jobs.send_email("old@example.com", "old", "<p>old</p>", idempotency_key="old")
    provider_server.default_delay_s = 0.5
    # A campaign-like draft (not a one-off key) sweeps the older pending one-off row along.
    campaign = Draft("waitlist/sweeper/2", "new@example.com", "new", "<p>new</p>")
    sending = asyncio.create_task(deliver(ctx, campaign))
    await asyncio.sleep(0.25)  # the batch of two is with the provider now

    # The one-off's own job arrives meanwhile: it waits for that batch, sends nothing.
    outcome = await deliver(ctx, Draft("caller/old", "old@example.com", "old", "<p>old</p>"))

    assert (await sending).status == "sent"
    assert (outcome.status, outcome.fresh) == ("sent", False)
    [request] = provider_server.requests
    assert sorted(e["to"][0] for e in request.json) == ["new@example.com", "old@example.com"]
    rows = {r.idempotency_key: r for r in await outbox_rows(sessions)}
    assert outcome.message_id == rows["caller/old"].provider_message_id is not None


async def test_campaign_rows_are_never_swept(
    job_ctx: Callable[..., Awaitable[Ctx]],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    # A campaign step that went back to `pending` (a 429 in an earlier tick): its tick's
    # `after` hook must run when it settles, so only its tick may send it.
    async with sessions.begin() as session:
        await session.execute(
            text("""
                INSERT INTO email_messages (idempotency_key, to_email, subject, html, status)
                VALUES ('waitlist/left/2', 'left@example.com', 's', '<p>h</p>', 'pending')
            """)
        )

    outcome = await deliver(ctx, Draft("caller/one", "one@example.com", "one", "<p>one</p>"))

    assert outcome.status == "sent"
    [request] = provider_server.requests
    assert request.path == "/emails"
    rows = {r.idempotency_key: r for r in await outbox_rows(sessions)}
    assert (rows["waitlist/left/2"].status, rows["waitlist/left/2"].attempts) == ("pending", 0)


async def test_a_claim_that_gets_no_send_slot_in_time_is_given_back_unsent(
    job_ctx: Callable[..., Awaitable[Ctx]],
    client_of: Callable[..., JobsClient],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jobs.email.batcher, "SLOT_WAIT_S", 0.2)
    ctx = await job_ctx("resend", email_rate_limit_per_s=1.0)
    limiter: RateLimiter = ctx["email_rate_limiter"]
    await client_of().send_email("a@example.com", "a", "<p>a</p>", idempotency_key="a")
    async with sessions() as blocker, blocker.begin():
        # Hold the row, so the claim waits in its transaction after the group saw a free slot.
        await blocker.execute(
            text("SELECT 1 FROM email_messages WHERE idempotency_key = 'caller/a' FOR UPDATE")
        )
        task = asyncio.create_task(
            deliver(ctx, Draft("caller/a", "a@example.com", "a", "<p>a</p>"))
        )
        await _until_a_claim_waits_for_a_lock(sessions)
        # Another process takes the slot meanwhile: the next one is a second away.
        await RateLimiter(
            redis=ctx["redis"], rate_per_s=1.0, key_prefix=limiter.key_prefix
        ).acquire()

    with pytest.raises(TransientError, match="no send slot"):
        await task

    assert provider_server.requests == []
    [row] = await outbox_rows(sessions)
    # Nothing was sent, so nothing counts: the row is due again as it was.
    assert (row.status, row.attempts, row.claimed_by) == ("pending", 0, None)


async def _until_a_claim_waits_for_a_lock(sessions: async_sessionmaker[AsyncSession]) -> None:
    for _ in range(200):
        async with sessions() as session:
            waiting = await session.scalar(
                text("""
                    SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                """)
            )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the claim never reached the locked row")

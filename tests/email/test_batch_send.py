"""Batches through the fake Resend: composition, keys, member failures, 429s, suppression."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.email import suppression
from jobs.email.outbox import Draft, Outcome, deliver
from tests.conftest import RunBurst
from tests.support.provider_server import RESEND_BATCH, Answer, ProviderServer
from worker.client import JobsClient
from worker.context import Ctx
from worker.email_providers import EmailProvider, OutgoingEmail
from worker.email_providers.base import MemberAnswer
from worker.errors import RateLimited, TransientError
from worker.settings import Settings

from .conftest import outbox_rows

BuildCtx = Callable[..., Awaitable[Ctx]]


def drafts(count: int, prefix: str = "m") -> list[Draft]:
    return [
        Draft(f"caller/{prefix}-{n:03}", f"{prefix}{n}@example.com", f"s{n}", f"<p>{n}</p>", "t")
        for n in range(count)
    ]


async def deliver_all(ctx: Ctx, batch: list[Draft], **kwargs: Any) -> list[Any]:
    """Deliver concurrently, as a page or a burst does; outcomes and errors in order."""
    return list(
        await asyncio.gather(*(deliver(ctx, d, **kwargs) for d in batch), return_exceptions=True)
    )


def batch_requests(server: ProviderServer) -> list[Any]:
    return server.requests_to(RESEND_BATCH)


async def add_due_entries(sessions: async_sessionmaker[AsyncSession], count: int) -> None:
    """`count` confirmed waitlist entries whose step 2 is due."""
    async with sessions.begin() as session:
        await session.execute(
            text("""
                INSERT INTO waitlist_entries
                    (id, email, name, campaign_step, created_at, confirmed_at, next_email_at)
                SELECT gen_random_uuid(), 'w' || g || '@example.com', 'Wendy', 1,
                       now() - interval '3 days', now() - interval '3 days',
                       now() - interval '1 hour'
                FROM generate_series(1, :n) AS g
            """),
            {"n": count},
        )


async def test_a_campaign_page_goes_out_in_batches_of_100_each_email_once(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await add_due_entries(sessions, 250)
    # Resend's default rate: a group waits for its send slot, collecting the page's sends.
    settings = job_settings("resend", email_rate_limit_per_s=5.0)

    await arq_redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")
    await run_burst("default", settings_=settings)

    requests = batch_requests(provider_server)
    assert sorted(len(r.json) for r in requests) == [50, 100, 100]
    assert len(provider_server.requests) == 3
    keys = [r.headers["Idempotency-Key"] for r in requests]
    assert len(set(keys)) == 3 and all(k.startswith("batch/") for k in keys)
    assert all(r.headers["x-batch-validation"] == "permissive" for r in requests)
    sent_to = Counter(d.json["to"][0] for d in provider_server.delivered)
    assert len(sent_to) == 250 and set(sent_to.values()) == {1}
    rows = await outbox_rows(sessions)
    assert {(r.status, r.attempts) for r in rows} == {("sent", 1)}
    assert len({r.batch_id for r in rows}) == 3
    ids = {d.json["to"][0]: d.provider_id for d in provider_server.delivered}
    assert all(r.provider_message_id == ids[r.to_email] for r in rows)
    # Every member's `after` ran in its batch's settle: each entry advanced to step 2.
    async with sessions() as session:
        steps = (await session.execute(text("SELECT campaign_step FROM waitlist_entries"))).all()
    assert Counter(step for (step,) in steps) == {2: 250}
    # The body is the stored rows, ordered by id: what a resend would send again.
    for request in requests:
        batch_id = uuid.UUID(request.headers["Idempotency-Key"].removeprefix("batch/"))
        members = sorted((r for r in rows if r.batch_id == batch_id), key=lambda r: r.id)
        assert [e["to"][0] for e in request.json] == [r.to_email for r in members]


async def test_a_burst_of_send_email_jobs_coalesces_into_few_requests(
    client_of: Callable[..., JobsClient],
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    jobs = client_of()
    for n in range(150):
        await jobs.send_email(f"b{n}@example.com", f"b{n}", "<p>hi</p>", idempotency_key=f"b{n}")

    worker = await run_burst(
        "default", settings_=job_settings("resend", email_rate_limit_per_s=5.0)
    )

    assert (worker.jobs_complete, worker.jobs_failed) == (150, 0)
    # One request per email would be 150; the default queue's concurrent jobs share batches.
    assert len(provider_server.requests) <= 8
    assert Counter(d.json["subject"] for d in provider_server.delivered) == Counter(
        f"b{n}" for n in range(150)
    )
    assert {(r.status, r.attempts) for r in await outbox_rows(sessions)} == {("sent", 1)}


async def test_a_lone_email_leaves_alone_under_its_own_key(
    job_ctx: BuildCtx, provider_server: ProviderServer
) -> None:
    ctx = await job_ctx("resend")
    [outcome] = await deliver_all(ctx, drafts(1))
    assert isinstance(outcome, Outcome) and outcome.status == "sent"
    [request] = provider_server.requests
    assert (request.path, request.headers["Idempotency-Key"]) == ("/emails", "caller/m-000")


async def test_a_retry_after_a_timeout_resends_the_same_batch_under_the_same_key(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    batch = drafts(3)
    # Resend accepted the batch, and then its answer never came (the read timed out).
    provider_server.script(RESEND_BATCH, Answer(accept=True, hang=True))

    first = await deliver_all(ctx, batch)
    assert all(isinstance(r, TransientError) for r in first)
    rows = await outbox_rows(sessions)
    # Still claimed as one batch, with no live claimer: the next claim resends it at once.
    assert {(r.status, r.claimed_by, r.attempts) for r in rows} == {("sending", None, 1)}
    assert len({r.batch_id for r in rows}) == 1

    # Any one member's retry takes the whole batch over (here the last one's, alone).
    outcome = await deliver(ctx, batch[2])

    first_try, retry = batch_requests(provider_server)
    assert first_try.headers["Idempotency-Key"] == retry.headers["Idempotency-Key"]
    assert first_try.raw_body == retry.raw_body  # the same composition, from the stored rows
    assert len(provider_server.delivered) == 3  # Resend answered the first ids, sent nothing
    ids = {d.json["to"][0]: d.provider_id for d in provider_server.delivered}
    assert outcome.status == "sent" and outcome.message_id == ids[batch[2].to]
    rows = await outbox_rows(sessions)
    assert {(r.status, r.attempts) for r in rows} == {("sent", 2)}
    assert all(r.provider_message_id == ids[r.to_email] for r in rows)
    # The others' own retries find their rows settled: nothing more is sent.
    again = await deliver_all(ctx, batch[:2])
    assert [o.fresh for o in again] == [False, False]
    assert len(provider_server.requests) == 2


async def test_a_resent_batch_settles_a_member_held_for_review_as_sent(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    batch = drafts(3)
    provider_server.script(RESEND_BATCH, Answer(accept=True, hang=True))
    await deliver_all(ctx, batch)
    # One member was meanwhile held for review (its claim looked lost to another try).
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE email_messages SET status = 'review' WHERE idempotency_key = :key"),
            {"key": batch[0].key},
        )

    outcome = await deliver(ctx, batch[2])

    assert outcome.status == "sent"
    assert len(provider_server.delivered) == 3  # the same batch, answered again, sent once
    ids = {d.json["to"][0]: d.provider_id for d in provider_server.delivered}
    rows = {r.idempotency_key: r for r in await outbox_rows(sessions)}
    # Resend's answer under the batch's key proves the held member went too.
    assert rows[batch[0].key].status == "sent"
    assert rows[batch[0].key].provider_message_id == ids[batch[0].to]
    assert rows[batch[0].key].sent_at is not None


class WorkerKilled(Exception):
    """Stands for the process dying between Resend's answer and our commit."""


@dataclass(frozen=True)
class CrashAfterBatch:
    inner: Any

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def max_batch(self) -> int:
        return int(self.inner.max_batch)

    async def send(self, email: OutgoingEmail, idempotency_key: str) -> str:
        raise AssertionError("a batch of three never goes alone")

    async def send_batch(self, emails: Any, idempotency_key: str) -> list[MemberAnswer]:
        await self.inner.send_batch(emails, idempotency_key)
        raise WorkerKilled("killed after Resend answered")


async def test_a_crash_between_answer_and_commit_resends_the_same_batch(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    real: EmailProvider | None = ctx["email_provider"]
    assert real is not None
    ctx["email_provider"] = CrashAfterBatch(real)
    batch = drafts(3)
    assert all(isinstance(r, WorkerKilled) for r in await deliver_all(ctx, batch))
    # What the dead process left: every member `sending`, claimed by a process now gone.
    async with sessions.begin() as session:
        await session.execute(text("UPDATE email_messages SET claimed_by = 'gone-host:1'"))
    ctx["email_provider"] = real

    outcomes = await deliver_all(ctx, batch)

    assert [o.status for o in outcomes] == ["sent"] * 3
    first, resent = batch_requests(provider_server)
    assert first.headers["Idempotency-Key"] == resent.headers["Idempotency-Key"]
    assert first.raw_body == resent.raw_body
    assert len(provider_server.delivered) == 3
    assert {(r.status, r.attempts) for r in await outbox_rows(sessions)} == {("sent", 2)}


async def test_an_invalid_member_fails_alone_and_the_others_are_sent(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    batch = drafts(4)
    provider_server.reject_recipient(batch[1].to, "Invalid `to` field: m1@example.com")

    outcomes = await deliver_all(ctx, batch)

    assert [o.status for o in outcomes] == ["sent", "failed", "sent", "sent"]
    assert outcomes[1].detail == "resend refused this email: Invalid `to` field: m1@example.com"
    [request] = provider_server.requests
    assert len(request.json) == 4
    assert sorted(d.json["to"][0] for d in provider_server.delivered) == sorted(
        d.to for d in batch if d is not batch[1]
    )
    rows = {r.idempotency_key: r for r in await outbox_rows(sessions)}
    assert rows[batch[1].key].status == "failed"
    assert rows[batch[1].key].last_error == outcomes[1].detail
    assert all(
        rows[d.key].provider_message_id == o.message_id
        for d, o in zip(batch, outcomes, strict=True)
    )


@pytest.mark.parametrize("count", [1, 3])
async def test_a_429_does_not_count_an_attempt(
    count: int,
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    path = "/emails" if count == 1 else RESEND_BATCH
    # Longer than a flush waits out itself: the callers see it.
    provider_server.script(path, Answer(status=429, headers={"retry-after": "30"}))

    # A cron gives each message one attempt per tick: a counted 429 would fail it now.
    results = await deliver_all(ctx, drafts(count), max_attempts=1)

    assert all(isinstance(r, RateLimited) for r in results)
    rows = await outbox_rows(sessions)
    assert {(r.status, r.attempts) for r in rows} == {("pending", 0)}
    assert await ctx["email_rate_limiter"].paused_for_s() > 0  # every process waits
    await ctx["email_rate_limiter"].resume()

    outcomes = await deliver_all(ctx, drafts(count), max_attempts=1)
    assert [o.status for o in outcomes] == ["sent"] * count
    assert {(r.status, r.attempts) for r in await outbox_rows(sessions)} == {("sent", 1)}


async def test_a_suppressed_member_never_leaves_in_a_batch(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    client_of: Callable[..., JobsClient],
) -> None:
    ctx = await job_ctx("resend")
    batch = drafts(4)
    async with sessions.begin() as session:
        await suppression.suppress(session, batch[0].to, "bounce", "test")
    # One of them was stored `pending` by the client before its address bounced.
    pending = drafts(1, prefix="p")[0]
    await client_of().send_email(pending.to, pending.subject, pending.html, idempotency_key="p-000")
    async with sessions.begin() as session:
        await suppression.suppress(session, pending.to, "complaint", "test")

    outcomes = await deliver_all(ctx, [*batch, pending])

    assert [o.status for o in outcomes] == ["suppressed", "sent", "sent", "sent", "suppressed"]
    [request] = provider_server.requests
    assert sorted(e["to"][0] for e in request.json) == sorted(d.to for d in batch[1:])
    rows = {r.idempotency_key: r for r in await outbox_rows(sessions)}
    assert (rows[batch[0].key].status, rows[batch[0].key].attempts) == ("suppressed", 0)
    assert rows["caller/p-000"].status == "suppressed"


async def test_the_fake_enforces_a_request_rate_with_retry_after(
    job_ctx: BuildCtx, provider_server: ProviderServer
) -> None:
    ctx = await job_ctx("resend")
    provider_server.rate_limit_per_s = 1
    provider = ctx["email_provider"]
    assert provider is not None
    await provider.send(OutgoingEmail("a@x.io", ("b@x.io",), "s", "h"), "k1")
    with pytest.raises(RateLimited) as limited:
        await provider.send(OutgoingEmail("a@x.io", ("b@x.io",), "s", "h"), "k2")
    assert limited.value.retry_after_s == 1.0
    assert provider_server.rate_limited == 1 and len(provider_server.delivered) == 1


async def test_a_cancelled_caller_never_cancels_its_batch(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    provider_server.default_delay_s = 0.5
    batch = drafts(3)
    tasks = [asyncio.create_task(deliver(ctx, d)) for d in batch]
    await asyncio.sleep(0.25)  # the batch is with the provider now
    tasks[0].cancel()  # its job timed out

    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    outcomes = await asyncio.gather(*tasks[1:])

    assert [o.status for o in outcomes] == ["sent", "sent"]
    [request] = provider_server.requests
    assert len(request.json) == 3
    # The cancelled caller's email went with its batch and was settled with it.
    assert {r.status for r in await outbox_rows(sessions)} == {"sent"}


async def test_a_short_429_is_waited_out_and_the_same_batch_asked_again(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    provider_server.script(RESEND_BATCH, Answer(status=429, headers={"retry-after": "1"}))

    outcomes = await deliver_all(ctx, drafts(3), max_attempts=1)

    # Not left for a later tick over a second's wait: sent now, on the one counted attempt.
    assert [o.status for o in outcomes] == ["sent"] * 3
    refused, accepted = batch_requests(provider_server)
    assert refused.headers["Idempotency-Key"] == accepted.headers["Idempotency-Key"]
    assert refused.raw_body == accepted.raw_body
    assert {(r.status, r.attempts) for r in await outbox_rows(sessions)} == {("sent", 1)}
    assert (await ctx["email_rate_limiter"].pauses())["rate_limited"] == 1

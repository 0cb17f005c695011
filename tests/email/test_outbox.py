"""The outbox's guarantees, by calling the jobs with a real ctx: crashes, leases, the limiter."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
from arq.worker import Retry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.email.outbox import SEND_LEASE_S, SendResult
from jobs.email.transactional import send_email
from tests.support.provider_server import RESEND_EMAILS, SENDGRID_MAIL, Answer, ProviderServer
from tests.support.redis_replies import reply
from tests.support.result_shapes import assert_shape
from worker.context import Ctx
from worker.email_providers import EmailProvider, OutgoingEmail
from worker.errors import TransientError
from worker.process_info import process_key

from .conftest import RECIPIENT, outbox_rows

BuildCtx = Callable[..., Awaitable[Ctx]]
KWARGS: dict[str, Any] = {
    "to": RECIPIENT,
    "subject": "Hello",
    "html": "<p>Hello</p>",
    "idempotency_key": "crash-1",
}


class WorkerKilled(Exception):
    """Stands for the process dying between the provider's answer and our commit."""


@dataclass(frozen=True)
class CrashAfterSend:
    inner: EmailProvider

    @property
    def name(self) -> str:
        return self.inner.name

    async def send(self, email: OutgoingEmail, idempotency_key: str) -> str:
        await self.inner.send(email, idempotency_key)
        raise WorkerKilled("killed after the provider accepted")


async def crash_once(ctx: Ctx, sessions: async_sessionmaker[AsyncSession]) -> None:
    """Run send_email until the simulated crash, then age the claim past its lease."""
    real = ctx["email_provider"]
    assert real is not None  # the default queue's ctx always has one
    ctx["email_provider"] = CrashAfterSend(real)
    with pytest.raises(WorkerKilled):
        await send_email.coroutine(ctx, **KWARGS)
    ctx["email_provider"] = real
    [row] = await outbox_rows(sessions)
    assert row.status == "sending"  # what a killed worker leaves behind
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE email_messages SET updated_at = now() - make_interval(secs => :s)"),
            {"s": SEND_LEASE_S + 60},
        )


async def test_resend_crash_after_accept_resends_with_the_same_key_and_delivers_once(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("resend")
    await crash_once(ctx, sessions)

    result = await send_email.coroutine(ctx, **KWARGS)

    first, second = provider_server.requests_to(RESEND_EMAILS)
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "caller/crash-1"
    [delivery] = provider_server.delivered  # Resend answered the first id, sent nothing new
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("sent", 2)
    assert row.provider_message_id == delivery.provider_id == result["provider_message_id"]


async def test_sendgrid_crash_after_accept_goes_to_review_without_a_second_send(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("sendgrid")
    await crash_once(ctx, sessions)

    result = await send_email.coroutine(ctx, **KWARGS)
    again = await send_email.coroutine(ctx, **KWARGS)
    assert_shape(result, SendResult)
    assert_shape(again, SendResult)

    assert len(provider_server.requests_to(SENDGRID_MAIL)) == 1
    assert result["status"] == again["status"] == "review"
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("review", 1)
    assert row.last_error is not None and "not resent" in row.last_error


async def claimed_by_another_process(
    ctx: Ctx, sessions: async_sessionmaker[AsyncSession], *, heartbeat_age_ms: int
) -> None:
    """Crash a send, then make its claim another worker process's, seen `heartbeat_age_ms` ago."""
    real = ctx["email_provider"]
    assert real is not None  # the default queue's ctx always has one
    ctx["email_provider"] = CrashAfterSend(real)
    with pytest.raises(WorkerKilled):
        await send_email.coroutine(ctx, **KWARGS)
    ctx["email_provider"] = real
    other = "otherhost:4242"
    now_ms = int(time.time() * 1000)
    await reply(
        ctx["redis"].hset(process_key(other), mapping={"updated_ms": now_ms - heartbeat_age_ms})
    )
    await ctx["redis"].expire(process_key(other), 60)
    async with sessions.begin() as session:
        await session.execute(text("UPDATE email_messages SET claimed_by = :w"), {"w": other})


@pytest.mark.parametrize("provider", ["resend", "sendgrid"])
async def test_a_claim_inside_its_lease_is_not_sent_again(
    provider: str,
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx(provider)
    # Another worker process claimed it and is alive (its heartbeat is fresh): the send may
    # still be in flight there, so this try waits for a retry.
    await claimed_by_another_process(ctx, sessions, heartbeat_age_ms=0)

    with pytest.raises(TransientError, match="being sent by another try"):
        await send_email.coroutine(cast(Ctx, {**ctx, "job_id": "another-job"}), **KWARGS)
    assert len(provider_server.requests) == 1
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("sending", 1)


async def test_rate_limited_try_pauses_the_shared_limiter_and_defers_the_retry(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("sendgrid")
    # Longer than a flush waits out itself (jobs/email/exchange.py RATE_LIMITED_WAIT_S).
    reset_unix_s = int(time.time()) + 8
    provider_server.script(
        SENDGRID_MAIL, Answer(status=429, headers={"X-RateLimit-Reset": str(reset_unix_s)})
    )

    with pytest.raises(Retry) as retry:
        await send_email.run(ctx, **KWARGS)

    assert retry.value.defer_score is not None and retry.value.defer_score >= 1500
    assert await ctx["email_rate_limiter"].paused_for_s() > 1.0
    [row] = await outbox_rows(sessions)
    # A 429 is the limiter's fault, not the message's: its attempt is given back (audit H4).
    assert (row.status, row.attempts) == ("pending", 0)
    assert row.last_error is not None and "429" in row.last_error


@pytest.mark.parametrize("claimer", ["this process, send over", "a dead process"])
@pytest.mark.parametrize("provider", ["resend", "sendgrid"])
async def test_a_claim_whose_sender_ended_is_taken_over_inside_its_lease(
    provider: str,
    claimer: str,
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx(provider)
    if claimer == "a dead process":  # its heartbeat stopped 20 s ago (SIGKILL)
        await claimed_by_another_process(ctx, sessions, heartbeat_age_ms=20_000)
    else:  # this process's batch raised and is no longer in flight
        real = ctx["email_provider"]
        assert real is not None  # the default queue's ctx always has one
        ctx["email_provider"] = CrashAfterSend(real)
        with pytest.raises(WorkerKilled):
            await send_email.coroutine(ctx, **KWARGS)
        ctx["email_provider"] = real

    # No need to wait out the 120 s lease.
    result = await send_email.coroutine(cast(Ctx, {**ctx, "job_id": "rerun"}), **KWARGS)
    [row] = await outbox_rows(sessions)
    if provider == "resend":  # resent under the same key: delivered once
        assert (result["status"], row.status, row.attempts) == ("sent", "sent", 2)
        assert len(provider_server.delivered) == 1 and len(provider_server.requests) == 2
        assert {r.headers["Idempotency-Key"] for r in provider_server.requests} == {
            "caller/crash-1"
        }
    else:  # SendGrid cannot deduplicate: held for review, never resent
        assert (result["status"], row.status) == ("review", "review")
        assert len(provider_server.requests) == 1

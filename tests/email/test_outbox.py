"""The outbox's guarantees, by calling the jobs with a real ctx: crashes, leases, the limiter."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Retry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.email.outbox import SEND_LEASE_S, SendResult
from jobs.email.transactional import send_email
from tests.support.provider_server import RESEND_EMAILS, SENDGRID_MAIL, Answer, ProviderServer
from tests.support.result_shapes import assert_shape
from worker.context import Ctx
from worker.email_providers import EmailProvider, OutgoingEmail
from worker.errors import TransientError

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


@pytest.mark.parametrize("provider", ["resend", "sendgrid"])
async def test_a_claim_inside_its_lease_is_not_sent_again(
    provider: str,
    job_ctx: BuildCtx,
    arq_redis: ArqRedis,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx(provider)
    real = ctx["email_provider"]
    assert real is not None  # the default queue's ctx always has one
    ctx["email_provider"] = CrashAfterSend(real)
    with pytest.raises(WorkerKilled):
        await send_email.coroutine(ctx, **KWARGS)

    # Another job's try finds the claim fresh while the claiming job still holds its arq
    # lease: it may still be in flight, so it waits for a retry.
    await arq_redis.set(in_progress_key_prefix + ctx["job_id"], b"1", px=15_000)
    other = cast(Ctx, {**ctx, "job_id": "another-job"})
    with pytest.raises(TransientError, match="being sent by another try"):
        await send_email.coroutine(other, **KWARGS)
    assert len(provider_server.requests) == 1
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("sending", 1)


async def test_rate_limited_try_pauses_the_shared_limiter_and_defers_the_retry(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx("sendgrid")
    reset_unix_s = int(time.time()) + 3
    provider_server.script(
        SENDGRID_MAIL, Answer(status=429, headers={"X-RateLimit-Reset": str(reset_unix_s)})
    )

    with pytest.raises(Retry) as retry:
        await send_email.run(ctx, **KWARGS)

    assert retry.value.defer_score is not None and retry.value.defer_score >= 1500
    assert await ctx["email_rate_limiter"].paused_for_s() > 1.0
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error is not None and "429" in row.last_error


@pytest.mark.parametrize("provider", ["resend", "sendgrid"])
async def test_a_claim_whose_job_ended_is_taken_over_inside_its_lease(
    provider: str,
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ctx = await job_ctx(provider)
    real = ctx["email_provider"]
    assert real is not None  # the default queue's ctx always has one
    ctx["email_provider"] = CrashAfterSend(real)
    with pytest.raises(WorkerKilled):
        await send_email.coroutine(ctx, **KWARGS)
    ctx["email_provider"] = real

    # The claiming job holds no arq lease any more (its worker died): no need to wait 120 s.
    result = await send_email.coroutine(cast(Ctx, {**ctx, "job_id": "rerun"}), **KWARGS)
    [row] = await outbox_rows(sessions)
    if provider == "resend":  # resent under the same key: delivered once
        assert (result["status"], row.status, row.attempts) == ("sent", "sent", 2)
        assert len(provider_server.delivered) == 1 and len(provider_server.requests) == 2
    else:  # SendGrid cannot deduplicate: held for review, never resent
        assert (result["status"], row.status) == ("review", "review")
        assert len(provider_server.requests) == 1

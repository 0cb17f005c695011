"""One-off emails: `send_email` (any caller's message) and `send_welcome_email(user_id)`."""

from __future__ import annotations

import uuid
from typing import Any

from db.models import User
from jobs.email import drafts
from jobs.email.campaign import SEND_JOB_CAP_S
from jobs.email.keys import caller_key, job_key, welcome_key
from jobs.email.outbox import Draft, Outcome, SendResult, deliver, fail_message
from worker.context import Ctx
from worker.errors import PermanentError
from worker.job import job


def send_email_key(ctx: Ctx, idempotency_key: str | None) -> str:
    """`caller/<the caller's key>`, or `job/<arq job id>`: every retry of one job shares it."""
    if idempotency_key:
        return caller_key(idempotency_key)
    return job_key(ctx["job_id"])


def _result(outcome: Outcome) -> SendResult:
    # A refusal fails the job (visible in its result) without a retry; the row says why.
    if outcome.status == "failed" and outcome.fresh:
        raise PermanentError(outcome.detail or "the provider refused the email")
    return outcome.summary()


async def _fail_send_email(ctx: Ctx, kwargs: dict[str, Any], reason: str) -> None:
    await fail_message(ctx, send_email_key(ctx, kwargs.get("idempotency_key")), reason)


@job(timeout_cap_s=SEND_JOB_CAP_S, on_failure=_fail_send_email)
async def send_email(
    ctx: Ctx,
    to: str,
    subject: str,
    html: str,
    text: str | None = None,
    idempotency_key: str | None = None,
) -> SendResult:
    """Send one email through the outbox.

    Twice is harmless: the row keyed `caller/<idempotency_key>` (or `job/<this job's id>`) is
    settled by the first run, and with Resend the key also travels as `Idempotency-Key`. The
    client wrote the row (`pending`) before enqueueing; its first draft is the one sent.
    """
    if not isinstance(to, str) or "@" not in to:
        raise PermanentError(f"send_email: `to` must be one email address, got {to!r}")
    draft = Draft(send_email_key(ctx, idempotency_key), to, subject, html, text)
    return _result(await deliver(ctx, draft))


async def _fail_welcome(ctx: Ctx, kwargs: dict[str, Any], reason: str) -> None:
    await fail_message(ctx, welcome_key(kwargs["user_id"]), reason)


@job(timeout_cap_s=SEND_JOB_CAP_S, on_failure=_fail_welcome)
async def send_welcome_email(ctx: Ctx, user_id: str) -> SendResult:
    """Welcome a new user; keyed `welcome/<user_id>`, so a second run sends nothing."""
    # Swept into another job's batch (a burst), or a repeat: done, before the user's row is
    # read and the email rendered again.
    if (early := await ctx["email_batcher"].settled(ctx, welcome_key(user_id))) is not None:
        return _result(early)
    async with ctx["sessions"]() as session:
        user = await session.get(User, uuid.UUID(str(user_id)))
    if user is None:
        raise PermanentError(f"no user {user_id}")
    draft = drafts.welcome(user.id, user.email, user.name, ctx["settings"].app_url)
    return _result(await deliver(ctx, draft))

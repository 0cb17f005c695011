"""The outbox: one `email_messages` row per logical email, claimed before every provider call.

    pending ──claim──> sending ──2xx──────────────────────────────> sent
                         │ ────4xx──────────────────────────────> failed (provider's message)
                         │ ────429/5xx/refused──────────────────> pending (retried)
                         │ ────401/403/sending domain───────────> pending, attempt not counted;
                         │                                        sending halts everywhere
                         │ ────DeliveryUnknown, Resend──────────> pending (resent, same key)
                         │ ────DeliveryUnknown, SendGrid────────> review  (never resent)
    sending, found by a later try after SEND_LEASE_S, or sooner when the claiming arq job is
    known to have ended (this same job's earlier try, or a job Redis no longer shows running):
                           Resend: claimed again and resent with the same Idempotency-Key;
                           SendGrid: review.
    pending, or new ──claim, recipient suppressed (jobs/email/suppression.py)──> suppressed

A row starts `pending` when the client writes it at enqueue (`store_pending`: `send_email`, the
welcome email), or is inserted already claimed by the job (campaign steps, trial notices, a job
enqueued without the client); either way the claim below takes it over.

A row in `sent`, `failed`, `review` or `suppressed` is settled: claiming it sends nothing, so a
second enqueue, a retry or a duplicate delivery of the job is harmless. The claim commits before
the HTTP call (no row lock or connection is held while the provider answers); the lease tells a
crashed try (old claim) from one still in flight elsewhere (recent claim: retry later).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from arq.constants import in_progress_key_prefix
from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.email.suppression import is_campaign, suppressed_sql
from worker.context import Ctx
from worker.email_providers import DeliveryUnknown, OutgoingEmail, safe_to_resend
from worker.email_providers.base import check_headers
from worker.errors import PermanentError, ProviderFault, RateLimited, TransientError

log = logging.getLogger(__name__)

# Longer than one provider exchange can take (connect 5 s + read 15 s, worker.http), so a
# claim younger than this may still be in flight in another try and must not be resent.
SEND_LEASE_S = 120.0
# A 429 may pause every sender for up to 300 s (worker.email_providers.base): wait through it
# rather than burn a retry, but give up before the job's own time limit (SEND_JOB_CAP_S).
ACQUIRE_TIMEOUT_S = 400.0
SETTLED = ("sent", "failed", "review", "suppressed")
# Which arq job holds a message's claim (set in the claiming transaction, kept as long as the
# claim's lease): lets a later try tell a crashed claim from a live one without waiting it out.
CLAIMER_KEY_PREFIX = "c360:outbox:claimer:"

Status = Literal["sent", "failed", "review", "suppressed", "pending"]
Sessions = async_sessionmaker[AsyncSession]


@dataclass(frozen=True, slots=True)
class Draft:
    """A logical email and its idempotency key; the first draft stored under a key wins.

    `headers` travel with the stored row (a campaign step's `List-Unsubscribe`), checked here
    so a draft with a line break in a header can never be stored.
    """

    key: str
    to: str
    subject: str
    html: str
    text: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", check_headers(self.headers or {}))


class SendResult(TypedDict):
    """What a job that sends one email returns (`Outcome.summary`)."""

    key: str
    status: Status
    # True when the row was settled before this run: nothing was sent now.
    duplicate: bool
    provider_message_id: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the outbox row says after `deliver`; `fresh` is False when it was settled before."""

    key: str
    status: Status
    fresh: bool = True
    message_id: str | None = None
    detail: str | None = None

    @property
    def settled(self) -> bool:
        return self.status != "pending"

    def summary(self) -> SendResult:
        return {
            "key": self.key,
            "status": self.status,
            "duplicate": not self.fresh,
            "provider_message_id": self.message_id,
            "error": self.detail,
        }


# Runs in the transaction that settles the row, so "sent" and the state it advances (a
# campaign step, a plan change) commit together or not at all.
AfterSettled = Callable[[AsyncSession, Outcome], Awaitable[None]]

_INSERT_PENDING = text("""
    INSERT INTO email_messages (idempotency_key, to_email, subject, html, text, headers, status)
    VALUES (:key, :to, :subject, :html, :text, :headers, 'pending')
    ON CONFLICT (idempotency_key) DO NOTHING
""").bindparams(bindparam("headers", type_=JSONB(none_as_null=True)))
SUPPRESSED_DETAIL = "not sent: the recipient is on the suppression list"
# The suppression check rides in the claim's own statement (one primary-key lookup), so a
# suppressed recipient costs no extra round trip and is never claimed for sending.
_INSERT_CLAIMED = text(f"""
    INSERT INTO email_messages
        (idempotency_key, to_email, subject, html, text, headers, status, attempts, provider,
         updated_at, last_error)
    SELECT :key, :to, :subject, :html, :text, :headers,
           CASE WHEN suppressed THEN 'suppressed' ELSE 'sending' END,
           CASE WHEN suppressed THEN 0 ELSE 1 END, :provider, now(),
           CASE WHEN suppressed THEN CAST(:suppressed_detail AS text) END
    FROM (SELECT {suppressed_sql("CAST(:to AS text)", "CAST(:campaign AS boolean)")}
          AS suppressed) AS recipient
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id, attempts, status
""").bindparams(bindparam("headers", type_=JSONB(none_as_null=True)))
_LOCK_EXISTING = text(f"""
    SELECT id, status, attempts, provider_message_id, last_error, to_email, subject, html, text,
           headers, extract(epoch FROM now() - updated_at) AS claim_age_s,
           {suppressed_sql("to_email", "CAST(:campaign AS boolean)")} AS suppressed
    FROM email_messages WHERE idempotency_key = :key FOR UPDATE
""")
_RECLAIM = text("""
    UPDATE email_messages
    SET status = 'sending', attempts = attempts + 1, provider = :provider, updated_at = now()
    WHERE id = :id RETURNING attempts
""")
_SETTLE = text("""
    UPDATE email_messages
    SET status = :status, last_error = :error, updated_at = now(),
        provider_message_id = coalesce(:message_id, provider_message_id),
        sent_at = CASE WHEN :status = 'sent' THEN now() ELSE sent_at END
    WHERE id = :id AND (status <> 'sent' OR :status = 'sent')
""")
# The account was refused, not the message: back to pending as if this try never claimed it.
_RELEASE = text("""
    UPDATE email_messages
    SET status = 'pending', attempts = greatest(attempts - 1, 0), last_error = :error,
        updated_at = now()
    WHERE id = :id AND status = 'sending'
""")
_FAIL_BY_KEY = text("""
    UPDATE email_messages
    SET status = CASE WHEN status = 'sending' THEN 'review' ELSE 'failed' END,
        last_error = :error, updated_at = now()
    WHERE idempotency_key = :key AND status IN ('pending', 'sending')
""")


@dataclass(frozen=True, slots=True)
class _Claim:
    id: Any
    attempts: int
    draft: Draft


async def deliver(
    ctx: Ctx,
    draft: Draft,
    *,
    after: AfterSettled | None = None,
    max_attempts: int | None = None,
) -> Outcome:
    """Send `draft` at most once; returns the settled outcome.

    Transient failures are recorded (`pending`, `last_error`) and raised for a retry, unless
    `max_attempts` is given and reached: then the row fails (a cron has no arq retry per
    message). `after` runs in the transaction that settles the row, also for duplicates.
    A `ProviderFault` (the account refused, or sending halted because of one) is raised with
    the row `pending` and its attempt not counted: no number of them ever fails a message.
    """
    sessions, provider = ctx["sessions"], ctx["email_provider"]
    if provider is None:
        # Only a worker started without EMAIL_PROVIDER has none, and the default queue (the
        # one with the send jobs) refuses to start so (preflight.check_settings).
        raise RuntimeError("this worker has no email provider: EMAIL_PROVIDER is not set")
    resend_ok = safe_to_resend(provider)
    try:
        # Before the claim: the wait for a slot must not age the claim towards its lease.
        await ctx["email_rate_limiter"].acquire(timeout_s=ACQUIRE_TIMEOUT_S)
    except TimeoutError:
        raise TransientError(f"no send slot within {ACQUIRE_TIMEOUT_S:g} s") from None
    claim_or_outcome = await _claim(ctx, draft, provider.name, resend_ok, after)
    if isinstance(claim_or_outcome, Outcome):
        return claim_or_outcome
    claim = claim_or_outcome
    stored = claim.draft
    try:
        email = OutgoingEmail(
            sender=ctx["settings"].email_from,
            to=(stored.to,),
            subject=stored.subject,
            html=stored.html,
            text=stored.text,
            headers=stored.headers,
        )
        message_id = await provider.send(email, stored.key)
    except ProviderFault as exc:
        await _release(ctx, claim, exc)
        raise
    except PermanentError as exc:
        return await _settle(sessions, claim, "failed", after, detail=str(exc))
    except DeliveryUnknown as exc:
        if not resend_ok:
            log.warning("email %s may have been delivered; held for review: %s", draft.key, exc)
            return await _settle(sessions, claim, "review", after, detail=str(exc))
        return await _retry_or_fail(sessions, claim, exc, after, max_attempts)
    except RateLimited as exc:
        # Every process waits, not just this try: the provider's limit is per account.
        await ctx["email_rate_limiter"].pause_for(exc.retry_after_s)
        return await _retry_or_fail(sessions, claim, exc, after, max_attempts)
    except TransientError as exc:
        return await _retry_or_fail(sessions, claim, exc, after, max_attempts)
    return await _settle(sessions, claim, "sent", after, message_id=message_id)


async def _claimer_ended(ctx: Ctx, key: str) -> bool:
    """True when the arq job that claimed `key` is known to be over (crashed or cancelled).

    Known when the claim was made by an earlier try of this very job (arq runs one try of a
    job at a time), or by a job whose in-progress lease is gone (its worker died). Unknown
    (no record, Redis unreachable) counts as still running.
    """
    redis, job_id = ctx["redis"], ctx["job_id"]
    try:
        claimer = await redis.get(CLAIMER_KEY_PREFIX + key)
        if claimer is None:
            return False
        if claimer.decode() == job_id:
            return True
        return not await redis.exists(in_progress_key_prefix + claimer.decode())
    except Exception as exc:
        log.warning("could not check who claimed email %s: %s", key, exc)
        return False


async def _record_claimer(ctx: Ctx, key: str) -> None:
    redis, job_id = ctx["redis"], ctx["job_id"]
    try:
        await redis.set(CLAIMER_KEY_PREFIX + key, job_id, px=int(SEND_LEASE_S * 1000))
    except Exception as exc:
        # Without the record a crash of this try is recognised by the lease's age instead.
        log.warning("could not record the claimer of email %s: %s", key, exc)


async def _claim(
    ctx: Ctx, draft: Draft, provider: str, resend_ok: bool, after: AfterSettled | None
) -> _Claim | Outcome:
    campaign = is_campaign(draft.key)
    async with ctx["sessions"].begin() as session:
        params: dict[str, Any] = {"key": draft.key, "to": draft.to, "subject": draft.subject}
        params |= {"html": draft.html, "text": draft.text, "provider": provider}
        params["headers"] = dict(draft.headers) or None
        params |= {"campaign": campaign, "suppressed_detail": SUPPRESSED_DETAIL}
        inserted = (await session.execute(_INSERT_CLAIMED, params)).first()
        if inserted is not None and inserted.status == "suppressed":
            return await _suppressed(session, draft.key, after)
        if inserted is not None:  # the common case: a new message, claimed in one statement
            # Recorded under the new row's lock, before it commits: a later claimer waits.
            await _record_claimer(ctx, draft.key)
            return _Claim(inserted.id, inserted.attempts, draft)
        lock = {"key": draft.key, "campaign": campaign}
        row = (await session.execute(_LOCK_EXISTING, lock)).one()
        if row.status in SETTLED:
            outcome = Outcome(draft.key, row.status, False, row.provider_message_id, row.last_error)
            if after is not None:
                await after(session, outcome)
            return outcome
        stored = Draft(draft.key, row.to_email, row.subject, row.html, row.text, row.headers)
        if (
            row.status == "sending"
            and row.claim_age_s < SEND_LEASE_S
            and not await _claimer_ended(ctx, draft.key)
        ):
            raise TransientError(f"email {draft.key} is being sent by another try")
        if row.suppressed:
            params = {"id": row.id, "status": "suppressed", "error": SUPPRESSED_DETAIL}
            await session.execute(_SETTLE, params | {"message_id": None})
            return await _suppressed(session, draft.key, after)
        if row.status == "sending" and not resend_ok:
            detail = (
                f"found mid-send after a crash (attempt {row.attempts}); {provider} cannot "
                "deduplicate, so it was not resent: check the provider's activity"
            )
            log.warning("email %s held for review: %s", draft.key, detail)
            await session.execute(
                _SETTLE, {"id": row.id, "status": "review", "error": detail, "message_id": None}
            )
            outcome = Outcome(draft.key, "review", True, None, detail)
            if after is not None:
                await after(session, outcome)
            return outcome
        attempts = (await session.execute(_RECLAIM, {"id": row.id, "provider": provider})).one()
        await _record_claimer(ctx, draft.key)
        return _Claim(row.id, attempts.attempts, stored)


async def _suppressed(session: AsyncSession, key: str, after: AfterSettled | None) -> Outcome:
    """The outcome of a row just settled `suppressed`; `after` runs in the same transaction."""
    log.info("email %s not sent: its recipient is suppressed", key)
    outcome = Outcome(key, "suppressed", True, None, SUPPRESSED_DETAIL)
    if after is not None:
        await after(session, outcome)
    return outcome


async def _settle(
    sessions: Sessions,
    claim: _Claim,
    status: Status,
    after: AfterSettled | None,
    *,
    message_id: str | None = None,
    detail: str | None = None,
) -> Outcome:
    outcome = Outcome(claim.draft.key, status, True, message_id, detail)
    async with sessions.begin() as session:
        params = {"id": claim.id, "status": status, "error": detail, "message_id": message_id}
        await session.execute(_SETTLE, params)
        if after is not None and outcome.settled:
            await after(session, outcome)
    return outcome


async def _release(ctx: Ctx, claim: _Claim, exc: ProviderFault) -> None:
    async with ctx["sessions"].begin() as session:
        await session.execute(_RELEASE, {"id": claim.id, "error": str(exc)})
    # Every worker stops sending, not just this try: the next message would be refused too.
    if await ctx["email_rate_limiter"].halt(exc.retry_after_s, str(exc)):
        # Once per halt, cluster-wide. The text is the provider's (API key redacted).
        log.error(
            "email provider refused the account, not the message: %s. Sending is halted on "
            "every worker for %g s and due emails stay pending; check EMAIL_API_KEY and that "
            "EMAIL_FROM's domain is verified with the provider",
            exc,
            exc.retry_after_s,
        )


async def _retry_or_fail(
    sessions: Sessions,
    claim: _Claim,
    exc: TransientError,
    after: AfterSettled | None,
    max_attempts: int | None,
) -> Outcome:
    if max_attempts is not None and claim.attempts >= max_attempts:
        detail = f"gave up after {claim.attempts} attempts; last error: {exc}"
        return await _settle(sessions, claim, "failed", after, detail=detail)
    await _settle(sessions, claim, "pending", None, detail=str(exc))
    raise exc


async def store_pending(session: AsyncSession, draft: Draft) -> None:
    """Write `draft` as a `pending` row before its job is enqueued (the first draft stored wins).

    PostgreSQL then knows the email even if Redis loses its job, and the reconciler re-enqueues
    it; a repeat under the same key changes nothing, and a settled row stays settled.
    """
    params: dict[str, Any] = {"key": draft.key, "to": draft.to, "subject": draft.subject}
    params |= {"html": draft.html, "text": draft.text, "headers": dict(draft.headers) or None}
    await session.execute(_INSERT_PENDING, params)


async def fail_message(ctx: Ctx, key: str, reason: str) -> None:
    """`on_failure` of the send jobs: the job gave up, so the row must say why.

    A row still `sending` (stopped mid-send by the time limit) may have been delivered:
    it goes to `review`, not `failed`. Settled rows are left as they are.
    """
    async with ctx["sessions"].begin() as session:
        await session.execute(_FAIL_BY_KEY, {"key": key, "error": reason})

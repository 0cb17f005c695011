"""The outbox: one `email_messages` row per logical email, claimed before every provider call.

    pending ──claim──> sending ──2xx (its id in a batch's answer)──────> sent
                         │ ────4xx, or refused alone in a batch──────────> failed (its message)
                         │ ────429───────────────────────────────────────> pending, attempt not
                         │                                                 counted; all wait
                         │ ────401/403/sending domain────────────────────> pending, attempt not
                         │                                                 counted; all halt
                         │ ────refused connection, SendGrid 5xx──────────> pending (retried)
                         │ ────timeout after sending, Resend 5xx─────────> sending, released:
                         │                                                 the next claim resends
                         │                                                 the batch, same key
                         │ ────DeliveryUnknown, SendGrid─────────────────> review (never resent)
    sending, found by a later claim after SEND_LEASE_S, released, or sooner when its claiming
    process is dead (no heartbeat) or is this one with that batch no longer in flight:
                           Resend: the whole batch taken over, resent as stored under its key;
                           SendGrid: review.
    pending, or new ──claim, recipient suppressed (jobs/email/suppression.py)──> suppressed

A row starts `pending` when the client writes it at enqueue (`store_pending`: `send_email`, the
welcome email), or is inserted already claimed by the job (campaign steps, trial notices, a job
enqueued without the client); either way the claim takes it over.

`deliver` does not talk to the provider itself: it hands the draft to the process's batcher
(jobs/email/batcher.py), which claims, sends and settles concurrent drafts together: up to 100
in one Resend `POST /emails/batch` under `Idempotency-Key: batch/<batch_id>`, a lone one as
`POST /emails` under its own key (jobs/email/claims.py, jobs/email/flush.py). The claim commits
before the HTTP call (no row lock or connection is held while the provider answers).

A row in `sent`, `failed`, `review` or `suppressed` is settled: claiming it sends nothing, so a
second enqueue, a retry or a duplicate delivery of the job is harmless.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypedDict

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

# Re-exported: the crons and the tests read them here.
from jobs.email.claims import SEND_LEASE_S as SEND_LEASE_S
from jobs.email.claims import SETTLED as SETTLED
from jobs.email.claims import SUPPRESSED_DETAIL as SUPPRESSED_DETAIL
from worker.context import Ctx
from worker.email_providers.base import check_headers

Status = Literal["sent", "failed", "review", "suppressed", "pending"]
# A row in one of these never changes status again (`review` waits for a person).
FINAL_STATUSES: tuple[Status, ...] = ("sent", "failed", "suppressed")
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


class ManyHook(ABC):
    """An `AfterSettled` a batch's settle runs for all its members of one kind at once: one
    statement for 100 campaign steps instead of 100 (the campaign's largest cost per email).
    Called alone (a claim that finds its row settled), it runs for that one."""

    async def __call__(self, session: AsyncSession, outcome: Outcome) -> None:
        await self.run_many(session, [(self, outcome)])

    @classmethod
    @abstractmethod
    async def run_many(cls, session: AsyncSession, hooks: Sequence[tuple[Self, Outcome]]) -> None:
        """Run every hook of `hooks` (each with its outcome) in `session`'s transaction."""


_INSERT_PENDING = text("""
    INSERT INTO email_messages (idempotency_key, to_email, subject, html, text, headers, status)
    VALUES (:key, :to, :subject, :html, :text, :headers, 'pending')
    ON CONFLICT (idempotency_key) DO NOTHING
""").bindparams(bindparam("headers", type_=JSONB(none_as_null=True)))
_FAIL_BY_KEY = text("""
    UPDATE email_messages
    SET status = CASE WHEN status = 'sending' THEN 'review' ELSE 'failed' END,
        last_error = :error, updated_at = now()
    WHERE idempotency_key = :key AND status IN ('pending', 'sending')
""")


async def deliver(
    ctx: Ctx,
    draft: Draft,
    *,
    after: AfterSettled | None = None,
    max_attempts: int | None = None,
) -> Outcome:
    """Send `draft` at most once; returns the settled outcome.

    Transient failures are recorded (`last_error`) and raised for a retry, unless
    `max_attempts` is given and reached: then the row fails (a cron has no arq retry per
    message). A 429 is raised as `RateLimited` with its attempt given back. `after` runs in
    the transaction that settles the row, also for duplicates. A `ProviderFault` (the account
    refused, or sending halted because of one) is raised with the row `pending` and its
    attempt not counted: no number of them ever fails a message.
    """
    provider = ctx["email_provider"]
    if provider is None:
        # Only a worker started without EMAIL_PROVIDER has none, and the default queue (the
        # one with the send jobs) refuses to start so (preflight.check_settings).
        raise RuntimeError("this worker has no email provider: EMAIL_PROVIDER is not set")
    # Imported here: the batcher's flush builds on this module's Draft and Outcome.
    from jobs.email.flush import Submission

    outcome: Outcome = await ctx["email_batcher"].submit(
        ctx, provider, Submission(draft, after, max_attempts)
    )
    return outcome


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

"""The waitlist campaign: step 1 on confirmation, step 2 at +2 days, step 3 at +7 days (UTC).

Sign-up (`JobsClient.join_waitlist`) commits the entry with its first email already due
(`next_email_at = created_at`) and then enqueues the kickoff job for a prompt send: if Redis
loses that job, or the enqueue fails after the commit, the hourly cron sends it instead.
With WAITLIST_CONFIRM the entry starts unconfirmed (`confirmed_at` NULL) and that first email
is the confirmation (`waitlist-confirm/<entry_id>`), after which nothing is due
(`next_email_at` NULL) until the link is used: `JobsClient.confirm_waitlist` sets
`confirmed_at` and makes step 1 due. Entries unconfirmed after `drafts.CONFIRM_TTL` are
deleted by the hourly tick. Without WAITLIST_CONFIRM the entry is confirmed at sign-up and
its first email is step 1. The steps' schedule counts from `confirmed_at`.

Waitlist email needs APP_URL and SECRET_KEY (its links are signed): without them no waitlist
email is sent, the tick logs one error saying so, and every step stays due.

`waitlist_entries.campaign_step` counts the steps sent and `next_email_at` says when the next
one is due; both advance in the transaction that settles the step's outbox row, so a crash
leaves either "not sent, still due" or "sent, advanced", and a re-run sends nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NotRequired, Self, TypedDict

from sqlalchemy import Row, delete, func, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import WaitlistEntry
from jobs.email import drafts
from jobs.email.drafts import CampaignLinks, CampaignNotConfigured
from jobs.email.fanout import Fanout, SendCounts, as_result, halted
from jobs.email.outbox import (
    AfterSettled,
    Draft,
    ManyHook,
    Outcome,
    SendResult,
    deliver,
    fail_message,
)
from worker.context import Ctx
from worker.errors import PermanentError
from worker.job import job
from worker.retry import max_tries

log = logging.getLogger(__name__)

STEP_DUE_AFTER_SIGNUP = {1: timedelta(0), 2: timedelta(days=2), 3: timedelta(days=7)}
# A backlog (the cron down for a week) must not send steps 2 and 3 minutes apart.
MIN_STEP_GAP = timedelta(days=1)
PAGE_ROWS = 1000
# Two batches' worth in flight (the batcher coalesces them into requests of up to 100,
# jobs/email/batcher.py): one batch is being answered while the next waits for its send slot,
# so the provider's rate limit, not the job, is the bound.
SEND_CONCURRENCY = 200
# Below the hourly period, so one tick's run can never overlap the next one's: a message
# found mid-send is then always a crashed try, never a live one elsewhere.
CRON_TIME_CAP_S = 3000.0
SEND_JOB_CAP_S = 600.0


def next_email_at(created_at: datetime, step_sent: int, now: datetime) -> datetime | None:
    """When the step after `step_sent` is due, or None when the campaign is over."""
    following = step_sent + 1
    if following not in STEP_DUE_AFTER_SIGNUP:
        return None
    return max(created_at + STEP_DUE_AFTER_SIGNUP[following], now + MIN_STEP_GAP)


_ADVANCE_MANY = text("""
    UPDATE waitlist_entries w SET campaign_step = v.step, next_email_at = v.next_at
    FROM unnest(CAST(:ids AS uuid[]), CAST(:steps AS integer[]),
                CAST(:next_ats AS timestamptz[])) AS v(id, step, next_at)
    WHERE w.id = v.id AND w.campaign_step < v.step
""")


@dataclass(frozen=True, slots=True)
class Advance(ManyHook):
    """Hook: mark `step` done (sent, failed or held for review) and schedule the next one.

    A batch's settle advances all its entries in one statement (`ManyHook`)."""

    entry_id: uuid.UUID
    created_at: datetime
    step: int

    @classmethod
    async def run_many(cls, session: AsyncSession, hooks: Sequence[tuple[Self, Outcome]]) -> None:
        now = datetime.now(UTC)
        params: dict[str, Any] = {
            "ids": [hook.entry_id for hook, _ in hooks],
            "steps": [hook.step for hook, _ in hooks],
            "next_ats": [next_email_at(hook.created_at, hook.step, now) for hook, _ in hooks],
        }
        await session.execute(_ADVANCE_MANY, params)


def advance(entry_id: uuid.UUID, created_at: datetime, step: int) -> AfterSettled:
    """Hook: mark `step` done (sent, failed or held for review) and schedule the next one."""
    return Advance(entry_id, created_at, step)


def await_confirmation(entry_id: uuid.UUID) -> AfterSettled:
    """Hook: the confirmation is sent (or failed): nothing more is due until it is used."""

    async def after(session: AsyncSession, outcome: Outcome) -> None:
        await session.execute(
            update(WaitlistEntry)
            .where(WaitlistEntry.id == entry_id, WaitlistEntry.confirmed_at.is_(None))
            .values(next_email_at=None)
        )

    return after


def _next_email(links: CampaignLinks, entry: Any) -> tuple[Draft, AfterSettled]:
    """The entry's due email (the confirmation, or its next step) and its settling hook."""
    if entry.confirmed_at is None:
        draft = drafts.waitlist_confirmation(entry.id, entry.email, entry.name, links)
        return draft, await_confirmation(entry.id)
    step = entry.campaign_step + 1
    draft = drafts.waitlist_step(entry.id, entry.email, entry.name, step, links)
    return draft, advance(entry.id, entry.confirmed_at, step)


async def _send_step(
    ctx: Ctx, links: CampaignLinks, entry: Row[Any], max_attempts: int | None
) -> Outcome:
    draft, hook = _next_email(links, entry)
    return await deliver(ctx, draft, after=hook, max_attempts=max_attempts)


class KickoffSkipped(TypedDict):
    """Nothing was sent: the entry had step 1 already, unsubscribed or converted, or the
    links cannot be made (`error`: APP_URL or SECRET_KEY missing; the hourly tick retries)."""

    entry_id: str
    status: Literal["skipped"]
    error: NotRequired[str]


class CampaignTickResult(SendCounts, total=True):
    """The hourly tick's pages read and what became of each due step."""

    pages: int


async def _fail_kickoff(ctx: Ctx, kwargs: dict[str, Any], reason: str) -> None:
    entry_id = uuid.UUID(str(kwargs["entry_id"]))
    async with ctx["sessions"]() as session:
        entry = await session.get(WaitlistEntry, entry_id)
    if entry is None:
        return
    if entry.confirmed_at is None:
        await fail_message(ctx, drafts.waitlist_confirmation_key(entry_id), reason)
        hook = await_confirmation(entry_id)
    else:  # step 1 is over either way; the campaign goes on with step 2
        await fail_message(ctx, f"waitlist/{entry_id}/1", reason)
        hook = advance(entry_id, entry.confirmed_at, 1)
    async with ctx["sessions"].begin() as session:
        await hook(session, Outcome("", "failed"))


@job(timeout_cap_s=SEND_JOB_CAP_S, on_failure=_fail_kickoff)
async def kickoff_waitlist_first_email(ctx: Ctx, entry_id: str) -> SendResult | KickoffSkipped:
    """Send the entry's first email now: its confirmation, or (confirmed) step 1.

    Twice is harmless: the outbox keys `waitlist-confirm/<entry_id>` and `waitlist/<entry_id>/1`
    send once, and the entry only advances while `campaign_step < 1`. Without APP_URL or
    SECRET_KEY nothing is sent and the email stays due for the hourly tick.
    """
    async with ctx["sessions"]() as session:
        entry = (
            await session.execute(
                select(WaitlistEntry).where(WaitlistEntry.id == uuid.UUID(str(entry_id)))
            )
        ).scalar_one_or_none()
    if entry is None:
        raise PermanentError(f"no waitlist entry {entry_id}")
    if entry.campaign_step >= 1 or entry.unsubscribed_at or entry.converted_at:
        return {"entry_id": str(entry.id), "status": "skipped"}
    try:
        links = CampaignLinks.of(ctx["settings"])
    except CampaignNotConfigured as exc:
        log.warning("%s; entry %s stays due for the hourly tick", exc, entry.id)
        return {"entry_id": str(entry.id), "status": "skipped", "error": str(exc)}
    draft, hook = _next_email(links, entry)
    outcome = await deliver(ctx, draft, after=hook)
    if outcome.status == "failed" and outcome.fresh:
        raise PermanentError(outcome.detail or "the provider refused the email")
    return outcome.summary()


def _due_page(now: datetime, cursor: tuple[datetime, uuid.UUID] | None) -> Any:
    query = (
        select(
            WaitlistEntry.id,
            WaitlistEntry.email,
            WaitlistEntry.name,
            WaitlistEntry.campaign_step,
            WaitlistEntry.confirmed_at,
            WaitlistEntry.next_email_at,
        )
        # The same predicate as the partial index ix_waitlist_next_email_at, so it is used.
        .where(
            WaitlistEntry.next_email_at.is_not(None),
            WaitlistEntry.unsubscribed_at.is_(None),
            WaitlistEntry.converted_at.is_(None),
            WaitlistEntry.next_email_at <= now,
            WaitlistEntry.campaign_step < drafts.LAST_WAITLIST_STEP,
        )
        .order_by(WaitlistEntry.next_email_at, WaitlistEntry.id)
        .limit(PAGE_ROWS)
    )
    if cursor is not None:
        query = query.where(tuple_(WaitlistEntry.next_email_at, WaitlistEntry.id) > cursor)
    return query


@job(timeout_cap_s=CRON_TIME_CAP_S)
async def send_waitlist_campaign_hourly(ctx: Ctx) -> CampaignTickResult:
    """Send every waitlist step due up to now, 1,000 entries a page, 200 sends at a time.

    Twice in one hour sends nothing new: a sent step has moved its entry's `next_email_at`
    into the future, and its outbox key would settle a re-send anyway. A step that fails
    transiently stays due (and `pending`) for the next tick, up to MAX_RETRIES + 1 attempts.
    When the provider refuses the account (a bad key, an unverified domain) the tick stops:
    every step not sent stays due, unskipped and with no attempt counted, for a later tick.
    """
    now = datetime.now(UTC)
    expired = await _expire_unconfirmed(ctx)
    try:
        links = CampaignLinks.of(ctx["settings"])
    except CampaignNotConfigured as exc:
        log.error("%s; every due step stays due", exc)  # once per tick
        return {"pages": 0, "expired_unconfirmed": expired, "not_configured": 1}
    max_attempts = max_tries(ctx["settings"].max_retries)
    counts: Counter[str] = Counter({"expired_unconfirmed": expired} if expired else {})
    cursor: tuple[datetime, uuid.UUID] | None = None
    pages = 0
    fanout: Fanout[Row[Any]] = Fanout(
        lambda entry: _send_step(ctx, links, entry, max_attempts), concurrency=SEND_CONCURRENCY
    )
    async with fanout:
        while True:
            async with ctx["sessions"]() as session:
                page = (await session.execute(_due_page(now, cursor))).all()
            if not page:
                break
            pages += 1
            cursor = (page[-1].next_email_at, page[-1].id)
            # Returns once the page's last entry is sending: the next page is read meanwhile.
            await fanout.start(page)
            if fanout.stopped or len(page) < PAGE_ROWS:
                break
            if asyncio.get_running_loop().time() > ctx.get("soft_deadline", float("inf")):
                # The rest stays due; the next tick continues where this one stopped.
                log.warning("waitlist campaign: soft time limit reached after %d pages", pages)
                counts["stopped_early"] = 1
                break
    counts += fanout.counts
    if halted(counts):
        # The outbox logged why, once; sending another page would be refused the same way.
        log.warning("waitlist campaign: stopped, the email provider refused the account")
        counts["stopped_early"] = 1
    log.info("waitlist campaign: %s", dict(counts))
    return {"pages": pages, **as_result(counts)}


async def _expire_unconfirmed(ctx: Ctx) -> int:
    """Delete sign-ups never confirmed within CONFIRM_TTL: nothing more is sent to them, and
    the address may sign up again (a new entry, a new link)."""
    async with ctx["sessions"].begin() as session:
        result = await session.execute(
            delete(WaitlistEntry).where(
                WaitlistEntry.confirmed_at.is_(None),
                WaitlistEntry.created_at < func.now() - drafts.CONFIRM_TTL,
            )
        )
    expired: int = getattr(result, "rowcount", 0) or 0
    if expired:
        log.info("waitlist: %d sign-ups expired unconfirmed", expired)
    return expired

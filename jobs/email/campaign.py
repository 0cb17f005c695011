"""The waitlist campaign: step 1 on sign-up, step 2 at +2 days, step 3 at +7 days (UTC).

Sign-up (`JobsClient.join_waitlist`) commits the entry with step 1 already due
(`next_email_at = created_at`) and then enqueues the kickoff job for a prompt send: if Redis
loses that job, or the enqueue fails after the commit, the hourly cron sends step 1 instead.

`waitlist_entries.campaign_step` counts the steps sent and `next_email_at` says when the next
one is due; both advance in the transaction that settles the step's outbox row, so a crash
leaves either "not sent, still due" or "sent, advanced", and a re-run sends nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypedDict

from sqlalchemy import Row, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import WaitlistEntry
from jobs.email import drafts
from jobs.email.fanout import SendCounts, as_result, halted, send_page
from jobs.email.outbox import AfterSettled, Outcome, SendResult, deliver, fail_message
from worker.context import Ctx
from worker.errors import PermanentError
from worker.job import job
from worker.retry import max_tries

log = logging.getLogger(__name__)

STEP_DUE_AFTER_SIGNUP = {1: timedelta(0), 2: timedelta(days=2), 3: timedelta(days=7)}
# A backlog (the cron down for a week) must not send steps 2 and 3 minutes apart.
MIN_STEP_GAP = timedelta(days=1)
PAGE_ROWS = 1000
# 100 in flight at 200 ms a send is ~500 sends/s: the rate limit, not the job, is the bound
# (bench/bench_email.py: 50 in flight gave ~117/s, 100 gave ~222/s, in the same setup).
SEND_CONCURRENCY = 100
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


def advance(entry_id: uuid.UUID, created_at: datetime, step: int) -> AfterSettled:
    """Hook: mark `step` done (sent, failed or held for review) and schedule the next one."""

    async def after(session: AsyncSession, outcome: Outcome) -> None:
        await session.execute(
            update(WaitlistEntry)
            .where(WaitlistEntry.id == entry_id, WaitlistEntry.campaign_step < step)
            .values(
                campaign_step=step,
                next_email_at=next_email_at(created_at, step, datetime.now(UTC)),
            )
        )

    return after


async def _send_step(ctx: Ctx, entry: Row[Any], step: int, max_attempts: int | None) -> Outcome:
    draft = drafts.waitlist_step(entry.id, entry.email, entry.name, step)
    hook = advance(entry.id, entry.created_at, step)
    return await deliver(ctx, draft, after=hook, max_attempts=max_attempts)


class KickoffSkipped(TypedDict):
    """The entry had step 1 already, or unsubscribed or converted: nothing was sent."""

    entry_id: str
    status: Literal["skipped"]


class CampaignTickResult(SendCounts, total=True):
    """The hourly tick's pages read and what became of each due step."""

    pages: int


async def _fail_kickoff(ctx: Ctx, kwargs: dict[str, Any], reason: str) -> None:
    entry_id = uuid.UUID(str(kwargs["entry_id"]))
    await fail_message(ctx, f"waitlist/{entry_id}/1", reason)
    async with ctx["sessions"].begin() as session:
        entry = await session.get(WaitlistEntry, entry_id)
        if entry is not None:  # step 1 is over either way; the campaign goes on with step 2
            await advance(entry_id, entry.created_at, 1)(session, Outcome("", "failed"))


@job(timeout_cap_s=SEND_JOB_CAP_S, on_failure=_fail_kickoff)
async def kickoff_waitlist_first_email(ctx: Ctx, entry_id: str) -> SendResult | KickoffSkipped:
    """Send waitlist step 1 now and schedule step 2 at sign-up + 2 days.

    Twice is harmless: the step's outbox key `waitlist/<entry_id>/1` sends once, and the entry
    only advances while `campaign_step < 1`.
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
    draft = drafts.waitlist_step(entry.id, entry.email, entry.name, 1)
    outcome = await deliver(ctx, draft, after=advance(entry.id, entry.created_at, 1))
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
            WaitlistEntry.created_at,
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
    """Send every waitlist step due up to now, 1,000 entries a page, 100 sends at a time.

    Twice in one hour sends nothing new: a sent step has moved its entry's `next_email_at`
    into the future, and its outbox key would settle a re-send anyway. A step that fails
    transiently stays due (and `pending`) for the next tick, up to MAX_RETRIES + 1 attempts.
    When the provider refuses the account (a bad key, an unverified domain) the tick stops:
    every step not sent stays due, unskipped and with no attempt counted, for a later tick.
    """
    now = datetime.now(UTC)
    max_attempts = max_tries(ctx["settings"].max_retries)
    counts: Counter[str] = Counter()
    cursor: tuple[datetime, uuid.UUID] | None = None
    pages = 0
    while True:
        async with ctx["sessions"]() as session:
            page = (await session.execute(_due_page(now, cursor))).all()
        if not page:
            break
        pages += 1
        cursor = (page[-1].next_email_at, page[-1].id)
        counts += await send_page(
            page,
            lambda entry: _send_step(ctx, entry, entry.campaign_step + 1, max_attempts),
            concurrency=SEND_CONCURRENCY,
        )
        if halted(counts):
            # The outbox logged why, once; sending another page would be refused the same way.
            log.warning("waitlist campaign: stopped, the email provider refused the account")
            counts["stopped_early"] = 1
            break
        if len(page) < PAGE_ROWS:
            break
        if asyncio.get_running_loop().time() > ctx.get("soft_deadline", float("inf")):
            # The rest stays due; the next tick continues where this one stopped.
            log.warning("waitlist campaign: soft time limit reached after %d pages", pages)
            counts["stopped_early"] = 1
            break
    log.info("waitlist campaign: %s", dict(counts))
    return {"pages": pages, **as_result(counts)}

"""Trial notices: a reminder once when the trial ends within 3 days, an expiry notice once when
it has ended, and the plan moved from `trial` to `expired` with that notice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import Row, Select, exists, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import EmailMessage, User
from jobs.email import drafts
from jobs.email.campaign import CRON_TIME_CAP_S, PAGE_ROWS, SEND_CONCURRENCY
from jobs.email.fanout import Fanout, SendCounts, as_result, halted
from jobs.email.outbox import SETTLED, Outcome, deliver
from worker.context import Ctx
from worker.job import job
from worker.retry import max_tries

log = logging.getLogger(__name__)

REMIND_BEFORE = timedelta(days=3)


class TrialTickResult(TypedDict):
    reminders: SendCounts
    expiries: SendCounts


def _not_settled(prefix: str) -> Any:
    """No settled outbox row `<prefix>/<user id>`: sent once means never selected again."""
    key = literal(f"{prefix}/") + User.id.cast(EmailMessage.idempotency_key.type)
    return ~exists().where(EmailMessage.idempotency_key == key, EmailMessage.status.in_(SETTLED))


def _reminders_due(now: datetime) -> Select[Any]:
    return select(User.id, User.email, User.name, User.trial_ends_at).where(
        User.plan == "trial",
        User.trial_ends_at > now,
        User.trial_ends_at <= now + REMIND_BEFORE,
        _not_settled("trial-reminder"),
    )


def _expiries_due(now: datetime) -> Select[Any]:
    return select(User.id, User.email, User.name, User.trial_ends_at).where(
        User.plan == "trial", User.trial_ends_at <= now
    )


async def _expire_plan(user_id: uuid.UUID, session: AsyncSession) -> None:
    await session.execute(
        update(User).where(User.id == user_id, User.plan == "trial").values(plan="expired")
    )


async def _pages(ctx: Ctx, query: Select[Any], send_one: Callable[[Row[Any]], Any]) -> Counter[str]:
    """Keyset pages by id over `query`, sent with one bound on the sends in flight; the next
    page is read while the previous one's tail is sending (jobs/email/fanout.py)."""
    after: uuid.UUID | None = None
    stopped_early = False
    async with Fanout(send_one, concurrency=SEND_CONCURRENCY) as fanout:
        while True:
            page_query = query.order_by(User.id).limit(PAGE_ROWS)
            if after is not None:
                page_query = page_query.where(User.id > after)
            async with ctx["sessions"]() as session:
                page = (await session.execute(page_query)).all()
            if not page:
                break
            after = page[-1].id
            await fanout.start(page)
            if fanout.stopped or len(page) < PAGE_ROWS:
                break
            if asyncio.get_running_loop().time() > ctx.get("soft_deadline", float("inf")):
                stopped_early = True  # the rest is still due at the next tick
                break
    counts = fanout.counts
    if stopped_early or halted(counts):  # halted: the account was refused, the rest waits
        counts["stopped_early"] = 1
    return counts


@job(timeout_cap_s=CRON_TIME_CAP_S)
async def check_trial_expirations(ctx: Ctx) -> TrialTickResult:
    """Send due trial reminders and expiry notices; expire the plans whose notice is settled.

    Twice is harmless: a user with a settled reminder row is not selected again, an expired
    plan is not selected again, and the outbox keys (`trial-reminder/<id>`,
    `trial-expired/<id>`) settle any re-send. The plan changes in the transaction that settles
    the notice, so a crash cannot expire a plan without its notice (or notify twice); a notice
    failing transiently keeps the plan `trial` until a later tick settles it. When the provider
    refuses the account the tick stops, and no plan expires without its notice.
    """
    now = datetime.now(UTC)
    max_attempts = max_tries(ctx["settings"].max_retries)
    app_url = ctx["settings"].app_url

    async def remind(user: Row[Any]) -> Outcome:
        # Whole days left, as people count them: 2 days 5 hours is "2 days", 5 hours is "1 day".
        days_left = max(1, (user.trial_ends_at - now).days)
        draft = drafts.trial_reminder(
            user.id, user.email, user.name, user.trial_ends_at, days_left, app_url
        )
        return await deliver(ctx, draft, max_attempts=max_attempts)

    async def expire(user: Row[Any]) -> Outcome:
        async def after(session: AsyncSession, outcome: Outcome) -> None:
            await _expire_plan(user.id, session)

        draft = drafts.trial_expired(user.id, user.email, user.name, app_url)
        return await deliver(ctx, draft, after=after, max_attempts=max_attempts)

    reminders = await _pages(ctx, _reminders_due(now), remind)
    expiries: Counter[str] = Counter()
    if not halted(reminders):
        expiries = await _pages(ctx, _expiries_due(now), expire)
    if halted(reminders) or halted(expiries):
        log.warning("trial notices: stopped, the email provider refused the account")
    return {"reminders": as_result(reminders), "expiries": as_result(expiries)}

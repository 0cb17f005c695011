"""Upsert the platform's own people (users, waitlist entries) to SendGrid Marketing Contacts.

Only `users` and `waitlist_entries` are read. `contacts` are what customers imported: their
data, never ours to market to, so no query here touches that table.

The daily sync walks waitlist entries, then users (so a user's own name wins for an email in
both), by id in batches of at most the provider's per-call limit (30,000). After each accepted
batch it stores its cursor in `job_checkpoints`; a failed or stopped run resumes from there,
and a finished run makes the next one start over.

Consent: an unsubscribed waitlist entry (`unsubscribed_at` set) is never pushed, nor is a user
with the same address (the address said no, whatever table it is in). Each daily run first
removes from SendGrid the addresses unsubscribed since the last run (all of them on the first
run, which also cleans up what older versions pushed every night); `sync_contact` of such an
address removes it at once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, NotRequired, TypedDict

from sqlalchemy import and_, exists, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from db.models import JobCheckpoint, User, WaitlistEntry
from worker.context import Ctx
from worker.job import job
from worker.marketing import MAX_CONTACTS_PER_CALL, MAX_EMAILS_PER_SEARCH, MarketingContact
from worker.ratelimit import RateLimiter

log = logging.getLogger(__name__)

CHECKPOINT = "sync_all_contacts"
# Waitlist first, users last: SendGrid keeps the last write, and a user's name is the newer.
SOURCES: dict[str, Any] = {"waitlist": WaitlistEntry, "users": User}
RATE_LIMIT_KEY_PREFIX = "c360:ratelimit:marketing"
REMOVALS_CHECKPOINT = "sync_all_contacts:unsubscribed"
# Each run re-removes what was unsubscribed this long before the previous run started: an
# unsubscribe whose transaction began earlier but committed after that run read the table
# carries an older `unsubscribed_at`. Deleting a contact twice is harmless.
REMOVALS_OVERLAP = timedelta(hours=1)
REMOVAL_PAGE_ROWS = 1000


class SyncContactResult(TypedDict):
    synced: int  # 1 when the address was pushed
    provider: NotRequired[str]  # "none": MARKETING_PROVIDER=none, nothing was done
    removed: NotRequired[int]  # an unsubscribed address: contacts removed from the provider
    reason: NotRequired[str]  # why nothing was pushed
    provider_job_id: NotRequired[str | None]  # the provider's id for the accepted upsert


class SyncAllResult(TypedDict):
    synced: int  # addresses pushed in this sync (a resumed run counts from the first run)
    provider: NotRequired[str]  # "none": MARKETING_PROVIDER=none, nothing was done
    batches: NotRequired[int]
    removed: NotRequired[int]  # unsubscribed contacts removed first
    resumed: NotRequired[bool]  # this run continued where a failed or stopped one left off
    done: NotRequired[bool]  # False: stopped at the soft time limit; tomorrow's run resumes


def unsubscribed(email: Any) -> Any:
    """Whether an unsubscribed waitlist entry has the address `email` (a column)."""
    return exists().where(
        func.lower(WaitlistEntry.email) == func.lower(email),
        WaitlistEntry.unsubscribed_at.is_not(None),
    )


def consented(model: Any) -> Any:
    """The rows of `model` (User or WaitlistEntry) whose address may be pushed."""
    if model is WaitlistEntry:  # an unconfirmed sign-up (WAITLIST_CONFIRM) agreed to nothing
        return and_(
            WaitlistEntry.unsubscribed_at.is_(None), WaitlistEntry.confirmed_at.is_not(None)
        )
    return ~unsubscribed(model.email)


def contact(email: str, name: str | None) -> MarketingContact:
    """Our tables hold one `name`: its first word is the first name, the rest the last."""
    first, _, last = (name or "").strip().partition(" ")
    return MarketingContact(email=email.strip().lower(), first_name=first, last_name=last.strip())


def _limiter(ctx: Ctx) -> RateLimiter:
    # Its own key and its own figure: a 429 from the contacts API must not pause mail sends,
    # nor the reverse, and Resend's 5 requests/s says nothing about SendGrid's contacts API.
    rate_per_s = ctx["settings"].marketing_rate_per_s
    return RateLimiter(ctx["redis"], rate_per_s, key_prefix=RATE_LIMIT_KEY_PREFIX)


def _batch_size(ctx: Ctx) -> int:
    limit = getattr(ctx["marketing_provider"], "max_contacts_per_call", MAX_CONTACTS_PER_CALL)
    return min(int(limit), MAX_CONTACTS_PER_CALL)


@job(timeout_cap_s=600)
async def sync_contact(ctx: Ctx, email: str) -> SyncContactResult:
    """Upsert one platform user or waitlist entry by email; the upsert is idempotent.

    An address that unsubscribed is removed from the provider instead (idempotent too).
    """
    provider = ctx["marketing_provider"]
    if provider.name == "none":
        log.info("MARKETING_PROVIDER=none: sync_contact does nothing")
        return {"synced": 0, "provider": "none"}
    wanted = email.strip().lower()
    found = None
    async with ctx["sessions"]() as session:
        said_no = bool(await session.scalar(select(unsubscribed(wanted))))
        # A user's own record wins over their old waitlist entry.
        for model in () if said_no else (User, WaitlistEntry):
            query = select(model.email, model.name).where(func.lower(model.email) == wanted)
            found = (await session.execute(query.limit(1))).first()
            if found is not None:
                break
    if said_no:
        await _limiter(ctx).acquire()
        removed = await provider.remove_batch([wanted])
        return {"synced": 0, "removed": removed, "reason": "unsubscribed"}
    if found is None:
        return {"synced": 0, "reason": "not a platform user or waitlist entry"}
    await _limiter(ctx).acquire()
    job_id = await provider.upsert_batch([contact(found.email, found.name)])
    return {"synced": 1, "provider_job_id": job_id}


async def _load_checkpoint(ctx: Ctx) -> dict[str, Any]:
    async with ctx["sessions"]() as session:
        row = await session.get(JobCheckpoint, CHECKPOINT)
    value = dict(row.value) if row is not None else {}
    if not value or value.get("done"):
        return {"phase": next(iter(SOURCES)), "after_id": None, "synced": 0, "done": False}
    return value


async def _save_checkpoint(ctx: Ctx, value: dict[str, Any], name: str = CHECKPOINT) -> None:
    value = value | {"at": datetime.now(UTC).isoformat()}
    async with ctx["sessions"].begin() as session:
        await session.execute(
            pg_insert(JobCheckpoint)
            .values(name=name, value=value)
            .on_conflict_do_update(
                index_elements=[JobCheckpoint.name], set_={"value": value, "updated_at": func.now()}
            )
        )


@job()
async def sync_all_contacts(ctx: Ctx) -> SyncAllResult:
    """Upsert every user and waitlist entry in batches of at most 30,000, resumably.

    Twice is harmless: the upsert is idempotent, and a re-run after a failure resumes from the
    last accepted batch (`job_checkpoints`) instead of sending everything again.
    """
    provider = ctx["marketing_provider"]
    if provider.name == "none":
        log.info("MARKETING_PROVIDER=none: sync_all_contacts does nothing")
        return {"synced": 0, "provider": "none"}
    batch_size, limiter = _batch_size(ctx), _limiter(ctx)
    removed = await _remove_unsubscribed(ctx, limiter)
    state = await _load_checkpoint(ctx)
    resumed = state["after_id"] is not None or state["phase"] != next(iter(SOURCES))
    phases = list(SOURCES)
    batches = 0
    for phase in phases[phases.index(state["phase"]) :]:
        model = SOURCES[phase]
        after_id = state["after_id"] if phase == state["phase"] else None
        while True:
            query = (
                select(model.id, model.email, model.name)
                .where(consented(model))
                .order_by(model.id)
                .limit(batch_size)
            )
            if after_id is not None:
                query = query.where(model.id > after_id)
            async with ctx["sessions"]() as session:
                rows = (await session.execute(query)).all()
            if not rows:
                break
            await limiter.acquire()
            await provider.upsert_batch([contact(r.email, r.name) for r in rows])
            batches += 1
            after_id = str(rows[-1].id)
            state = {"phase": phase, "after_id": after_id, "synced": state["synced"] + len(rows)}
            await _save_checkpoint(ctx, state | {"done": False})
            if len(rows) < batch_size:
                break
            if asyncio.get_running_loop().time() > ctx.get("soft_deadline", float("inf")):
                log.warning("marketing sync: soft time limit; tomorrow's run resumes here")
                return {
                    "synced": state["synced"],
                    "batches": batches,
                    "removed": removed,
                    "done": False,
                }
        state = {"phase": phase, "after_id": None, "synced": state["synced"]}
    await _save_checkpoint(ctx, {"phase": phases[-1], "after_id": None} | state | {"done": True})
    return {
        "synced": state["synced"],
        "batches": batches,
        "removed": removed,
        "resumed": resumed,
        "done": True,
    }


async def _remove_unsubscribed(ctx: Ctx, limiter: RateLimiter) -> int:
    """Remove the addresses unsubscribed since the last run; how many contacts were found.

    Runs before the upserts, so one unsubscribing while they run (pushed from a page read just
    before) is removed by the next run: its `unsubscribed_at` is after this run's start.
    """
    async with ctx["sessions"]() as session:
        row = await session.get(JobCheckpoint, REMOVALS_CHECKPOINT)
        started = await session.scalar(select(func.now()))
    since = row.value.get("since") if row is not None else None
    query = select(WaitlistEntry.id, WaitlistEntry.email).where(
        WaitlistEntry.unsubscribed_at.is_not(None)
    )
    if since is not None:
        query = query.where(WaitlistEntry.unsubscribed_at >= datetime.fromisoformat(since))
    provider, removed, after_id = ctx["marketing_provider"], 0, None
    while True:
        page_query = query.order_by(WaitlistEntry.id).limit(REMOVAL_PAGE_ROWS)
        if after_id is not None:
            page_query = page_query.where(WaitlistEntry.id > after_id)
        async with ctx["sessions"]() as session:
            rows = (await session.execute(page_query)).all()
        if not rows:
            break
        after_id = rows[-1].id
        emails = [r.email.strip().lower() for r in rows]
        for start in range(0, len(emails), MAX_EMAILS_PER_SEARCH):
            await limiter.acquire()
            removed += await provider.remove_batch(emails[start : start + MAX_EMAILS_PER_SEARCH])
    assert started is not None
    next_since = (started - REMOVALS_OVERLAP).isoformat()
    await _save_checkpoint(ctx, {"since": next_since}, name=REMOVALS_CHECKPOINT)
    if removed:
        log.info("marketing sync: removed %d unsubscribed contact(s)", removed)
    return removed

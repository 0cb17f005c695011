"""Upsert the platform's own people (users, waitlist entries) to SendGrid Marketing Contacts.

Only `users` and `waitlist_entries` are read. `contacts` are what customers imported: their
data, never ours to market to, so no query here touches that table.

The daily sync walks waitlist entries, then users (so a user's own name wins for an email in
both), by id in batches of at most the provider's per-call limit (30,000). After each accepted
batch it stores its cursor in `job_checkpoints`; a failed or stopped run resumes from there,
and a finished run makes the next one start over.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from db.models import JobCheckpoint, User, WaitlistEntry
from worker.context import Ctx
from worker.job import job
from worker.marketing import MAX_CONTACTS_PER_CALL, MarketingContact
from worker.ratelimit import RateLimiter

log = logging.getLogger(__name__)

CHECKPOINT = "sync_all_contacts"
# Waitlist first, users last: SendGrid keeps the last write, and a user's name is the newer.
SOURCES: dict[str, Any] = {"waitlist": WaitlistEntry, "users": User}
RATE_LIMIT_KEY_PREFIX = "c360:ratelimit:marketing"


def contact(email: str, name: str | None) -> MarketingContact:
    """Our tables hold one `name`: its first word is the first name, the rest the last."""
    first, _, last = (name or "").strip().partition(" ")
    return MarketingContact(email=email.strip().lower(), first_name=first, last_name=last.strip())


def _limiter(ctx: Ctx) -> RateLimiter:
    # Its own key: a 429 from the contacts API must not pause mail sends, nor the reverse.
    rate_per_s = ctx["settings"].email_rate_limit_per_s
    return RateLimiter(ctx["redis"], rate_per_s, key_prefix=RATE_LIMIT_KEY_PREFIX)


def _batch_size(ctx: Ctx) -> int:
    limit = getattr(ctx["marketing_provider"], "max_contacts_per_call", MAX_CONTACTS_PER_CALL)
    return min(int(limit), MAX_CONTACTS_PER_CALL)


@job(timeout_cap_s=600)
async def sync_contact(ctx: Ctx, email: str) -> dict[str, Any]:
    """Upsert one platform user or waitlist entry by email; the upsert is idempotent."""
    provider = ctx["marketing_provider"]
    if provider.name == "none":
        log.info("MARKETING_PROVIDER=none: sync_contact does nothing")
        return {"synced": 0, "provider": "none"}
    wanted = email.strip().lower()
    found = None
    async with ctx["sessions"]() as session:
        # A user's own record wins over their old waitlist entry.
        for model in (User, WaitlistEntry):
            query = select(model.email, model.name).where(func.lower(model.email) == wanted)
            found = (await session.execute(query.limit(1))).first()
            if found is not None:
                break
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


async def _save_checkpoint(ctx: Ctx, value: dict[str, Any]) -> None:
    value = value | {"at": datetime.now(UTC).isoformat()}
    async with ctx["sessions"].begin() as session:
        await session.execute(
            pg_insert(JobCheckpoint)
            .values(name=CHECKPOINT, value=value)
            .on_conflict_do_update(
                index_elements=[JobCheckpoint.name], set_={"value": value, "updated_at": func.now()}
            )
        )


@job()
async def sync_all_contacts(ctx: Ctx) -> dict[str, Any]:
    """Upsert every user and waitlist entry in batches of at most 30,000, resumably.

    Twice is harmless: the upsert is idempotent, and a re-run after a failure resumes from the
    last accepted batch (`job_checkpoints`) instead of sending everything again.
    """
    provider = ctx["marketing_provider"]
    if provider.name == "none":
        log.info("MARKETING_PROVIDER=none: sync_all_contacts does nothing")
        return {"synced": 0, "provider": "none"}
    batch_size, limiter = _batch_size(ctx), _limiter(ctx)
    state = await _load_checkpoint(ctx)
    resumed = state["after_id"] is not None or state["phase"] != next(iter(SOURCES))
    phases = list(SOURCES)
    batches = 0
    for phase in phases[phases.index(state["phase"]) :]:
        model = SOURCES[phase]
        after_id = state["after_id"] if phase == state["phase"] else None
        while True:
            query = select(model.id, model.email, model.name).order_by(model.id).limit(batch_size)
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
                return {"synced": state["synced"], "batches": batches, "done": False}
        state = {"phase": phase, "after_id": None, "synced": state["synced"]}
    await _save_checkpoint(ctx, {"phase": phases[-1], "after_id": None} | state | {"done": True})
    return {"synced": state["synced"], "batches": batches, "resumed": resumed, "done": True}

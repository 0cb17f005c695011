"""The reconciler: PostgreSQL is the source of truth; re-enqueue what Redis forgot.

A Redis that lost its data (restarted without persistence, flushed, failed over to a stale
replica) forgets queued and running jobs, while PostgreSQL still shows their imports and
exports as `pending` or `processing`, and their one-off emails (`send_email`, welcome) as
outbox rows `pending` or `sending`. Every minute this cron re-enqueues such rows under the
same deterministic arq job id the client used (`import:<uuid>`, `export:<uuid>`,
`email:<key>`, `welcome:<uuid>`; jobs/email/keys.py maps an outbox row to its job).

It never runs a job twice at the same time: a row is re-enqueued only when Redis has no trace
of its job (no job key, no queue entry, no in-progress lease, no result), arq refuses a
duplicate id while the job exists, and an import holds a lease on its row (jobs/imports/lease.py)
and an export a PostgreSQL advisory lock.
An email is never sent twice either way: the outbox claim (jobs/email/outbox.py) sends a
`pending` row once, settles a repeat as a duplicate, and treats a `sending` row as a crashed
or live claim by its lease, whoever runs the job. Campaign steps and trial notices are not
re-enqueued here: their crons select whatever is still due. Rows younger than `MIN_AGE_S` are
left alone: the client commits the row before it enqueues.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypedDict, cast

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import OPEN_STATUSES, ContactImportJob, EmailMessage, Export
from jobs.email.keys import REDRIVEN_PREFIXES, job_of_key, send_job
from jobs.email.outbox import Draft
from worker.context import Ctx
from worker.job import CronSchedule, job
from worker.lease import RUNNING_KEY_PREFIX
from worker.routes import (
    EXPORT_ROUTES,
    PROCESS_CONTACTS_IMPORT,
    Route,
    enqueue,
    export_job_id,
    import_continuation_pointer,
    import_job_id,
)

log = logging.getLogger(__name__)

MIN_AGE_S = 60
OPEN_EMAIL_STATUSES = ("pending", "sending")
EXPORTS = frozenset(EXPORT_ROUTES.values())
# Oldest first, so a Redis that lost a large backlog is re-filled a page a minute, and a scan
# stays one bounded query (over the partial index ix_email_messages_open).
MAX_EMAILS_PER_RUN = 5000


@dataclass(frozen=True)
class Expected:
    """A job PostgreSQL expects to exist: how the client enqueued it (worker/client.py)."""

    arq_id: str
    route: Route
    kwargs: dict[str, Any]
    # An outbox row's key: its job's arguments (the stored email) are read once it is lost.
    outbox_key: str | None = None


async def expected_jobs(sessions: async_sessionmaker[AsyncSession]) -> list[Expected]:
    """Open imports, exports and one-off emails older than `MIN_AGE_S`: jobs that should exist."""
    cutoff = func.now() - timedelta(seconds=MIN_AGE_S)
    async with sessions() as session:
        imports = await session.scalars(
            select(ContactImportJob.id).where(
                ContactImportJob.status.in_(OPEN_STATUSES), ContactImportJob.created_at < cutoff
            )
        )
        expected = [
            Expected(import_job_id(i), PROCESS_CONTACTS_IMPORT, {"job_id": str(i)}) for i in imports
        ]
        exports = await session.execute(
            select(Export.id, Export.kind).where(
                Export.status.in_(OPEN_STATUSES), Export.created_at < cutoff
            )
        )
        expected += [
            Expected(export_job_id(i), EXPORT_ROUTES[kind], {"export_id": str(i)})
            for i, kind in exports
        ]
        emails = await session.scalars(
            select(EmailMessage.idempotency_key)
            .where(
                EmailMessage.status.in_(OPEN_EMAIL_STATUSES),
                EmailMessage.created_at < cutoff,
                or_(*(EmailMessage.idempotency_key.startswith(p) for p in REDRIVEN_PREFIXES)),
            )
            .order_by(EmailMessage.created_at)
            .limit(MAX_EMAILS_PER_RUN)
        )
        for key in emails:
            target = job_of_key(key)
            if target is not None:
                expected.append(Expected(target[1], target[0], {}, outbox_key=key))
    return expected


_TRACE_PREFIXES = (job_key_prefix, in_progress_key_prefix, result_key_prefix)


async def forgotten(redis: ArqRedis, expected: list[Expected]) -> list[Expected]:
    """Those of `expected` that Redis has no trace of, in two round trips.

    An import past its soft time limit goes on under a continuation id (jobs/imports/job.py):
    a trace of that job counts as a trace of the import.
    """
    if not expected:
        return []
    pointers = await redis.mget(
        [
            import_continuation_pointer(item.kwargs["job_id"])
            if item.route is PROCESS_CONTACTS_IMPORT
            else "c360:none"
            for item in expected
        ]
    )
    candidates = [
        [item.arq_id, *([pointer.decode()] if pointer else [])]
        for item, pointer in zip(expected, pointers, strict=True)
    ]
    async with redis.pipeline(transaction=False) as pipe:
        for item, arq_ids in zip(expected, candidates, strict=True):
            pipe.exists(*(prefix + arq_id for arq_id in arq_ids for prefix in _TRACE_PREFIXES))
            for arq_id in arq_ids:
                pipe.zscore(item.route.queue, arq_id)
        replies = iter(await pipe.execute())
    lost = []
    for item, arq_ids in zip(expected, candidates, strict=True):
        keys = next(replies)
        scores = [next(replies) for _ in arq_ids]
        if not keys and all(score is None for score in scores):
            lost.append(item)
    return lost


async def still_open(
    sessions: async_sessionmaker[AsyncSession], items: list[Expected]
) -> list[Expected]:
    """Those of `items` still open just before enqueueing (a job may have finished since the
    first read); an email comes back with its stored message as the job's arguments."""
    import_ids = [
        uuid.UUID(i.kwargs["job_id"]) for i in items if i.route is PROCESS_CONTACTS_IMPORT
    ]
    export_ids = [uuid.UUID(i.kwargs["export_id"]) for i in items if i.route in EXPORTS]
    email_keys = [i.outbox_key for i in items if i.outbox_key is not None]
    async with sessions() as session:
        open_imports = await session.scalars(
            select(ContactImportJob.id).where(
                ContactImportJob.id.in_(import_ids), ContactImportJob.status.in_(OPEN_STATUSES)
            )
        )
        open_exports = await session.scalars(
            select(Export.id).where(Export.id.in_(export_ids), Export.status.in_(OPEN_STATUSES))
        )
        reopened = {import_job_id(i) for i in open_imports} | {
            export_job_id(i) for i in open_exports
        }
        open_emails = await session.execute(
            select(
                EmailMessage.idempotency_key,
                EmailMessage.to_email,
                EmailMessage.subject,
                EmailMessage.html,
                EmailMessage.text_body,
            ).where(
                EmailMessage.idempotency_key.in_(email_keys),
                EmailMessage.status.in_(OPEN_EMAIL_STATUSES),
            )
        )
        emails = [send_job(Draft(*row)) for row in open_emails]
    return [item for item in items if item.arq_id in reopened] + [
        Expected(job.arq_job_id, job.route, job.kwargs) for job in emails if job is not None
    ]


async def prune_dead_leases(redis: ArqRedis) -> int:
    """Drop `c360:running:*` entries whose lease ran out (their worker died)."""
    now_ms = int(time.time() * 1000)
    pruned = 0
    async for key in redis.scan_iter(match=RUNNING_KEY_PREFIX + "*", count=1000):
        # redis-py types hash commands for sync and async clients at once.
        entries = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(key))
        dead = [
            job_id.decode()
            for job_id, raw in entries.items()
            if json.loads(raw).get("lease_until_ms", 0) < now_ms
        ]
        if dead:
            pruned += await cast(Awaitable[int], redis.hdel(key, *dead))
    return pruned


class ReconcileResult(TypedDict):
    enqueued: int  # jobs Redis had lost, enqueued again
    pruned_leases: int


@job(timeout_cap_s=50)
async def reconcile_jobs(ctx: Ctx) -> ReconcileResult:
    """Re-enqueue open imports, exports and emails that Redis lost; twice changes nothing."""
    redis, sessions = ctx["redis"], ctx["sessions"]
    lost = await forgotten(redis, await expected_jobs(sessions))
    enqueued = 0
    for item in await still_open(sessions, lost) if lost else []:
        if await enqueue(redis, item.route, item.arq_id, **item.kwargs) is not None:
            enqueued += 1
            log.warning("re-enqueued %s on %s: Redis had lost it", item.arq_id, item.route.queue)
    pruned = await prune_dead_leases(redis)
    return {"enqueued": enqueued, "pruned_leases": pruned}


JOBS = [reconcile_jobs]
# Every minute (arq's cron: unset fields match every value; seconds default to 0).
CRON_JOBS = [CronSchedule(reconcile_jobs)]

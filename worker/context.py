"""The typed ctx every job receives: what `lifecycle.startup` opened, plus arq's per-job keys.

Three layers, each a TypedDict whose keys are all there when code sees it (mypy checks a read
of a required key, not one of a `NotRequired` key: python/mypy#12094):

- `WorkerGiven`: what `worker.main.worker_settings` and arq put in the dict before startup;
- `Resources`: what `lifecycle.startup` opens, merged in as one literal once all of it is open;
- `Ctx` = both, plus the keys arq sets for each job run (`arq.worker.Worker.run_job`), which
  the arq job hooks (`on_job_start`, `on_job_end`, `after_job_end`) see too.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import datetime
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from worker.email_providers import EmailProvider
from worker.marketing import MarketingProvider
from worker.ratelimit import RateLimiter
from worker.routes import QueueName
from worker.settings import Settings
from worker.storage import Storage

if TYPE_CHECKING:
    import aioboto3
    from arq.connections import ArqRedis

    # Only for the types: these modules read a Ctx.
    from jobs.email.batcher import EmailBatcher
    from worker.lease import Leases
    from worker.recycle import Recycler


class WorkerGiven(TypedDict):
    # Given when the worker is built (worker.main.worker_settings).
    settings: Settings
    queue_name: QueueName
    # arq's own pool, set by arq before it calls `on_startup`.
    redis: ArqRedis


class Resources(TypedDict):
    """What `lifecycle.startup` opens; `exit_stack` closes it in reverse in `shutdown`."""

    exit_stack: AsyncExitStack
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    http: httpx.AsyncClient
    # None on a queue started without EMAIL_PROVIDER: only the default queue sends email and
    # must name one (preflight.check_settings), so its jobs always find a provider here.
    email_provider: EmailProvider | None
    marketing_provider: MarketingProvider
    email_rate_limiter: RateLimiter
    # A Session holds no connection; storage opens short-lived clients from it.
    s3_session: aioboto3.Session
    storage: Storage
    # Reliability state of this process, read by the arq hooks in worker/lease.py and
    # worker/recycle.py.
    leases: Leases
    recycler: Recycler
    # Coalesces this process's email sends into provider batches (jobs/email/batcher.py).
    email_batcher: EmailBatcher


class Ctx(WorkerGiven, Resources):
    """What a job (and each arq job hook) receives."""

    # Set by arq for each job run.
    job_id: str
    job_try: int
    enqueue_time: datetime
    score: int
    # Set by worker.job for each job run: event-loop time after which a long job should
    # checkpoint and continue in a fresh try (the soft time limit). Not there when a test
    # calls a job's coroutine without the wrapper, so jobs read it with a default.
    soft_deadline: NotRequired[float]


def as_ctx(arq_ctx: dict[str, Any]) -> Ctx:
    """arq's plain dict as a job (or an arq job hook) sees it: arq types it `dict[Any, Any]`."""
    return cast(Ctx, arq_ctx)

"""Worker start-up and shutdown, and the order in which arq calls every hook of ours.

One worker process, `worker.main.worker_settings` wiring arq's hooks (arq.worker.Worker):

    worker_settings()          preflight.check_settings: refuse bad settings, nothing opened
    arq: create_pool           ctx["redis"]
    on_startup                 startup (below): preflight.check_redis, then every resource
      │                        into one AsyncExitStack, the lease renewal task among them;
      │                        the recycler gets the arq Worker (recycle.running_worker)
      │
      ├─ for each job arq claims (arq:in-progress:<id>, short once lease.shorten_initial_claim)
      │    arq: run_job        job ctx = startup's ctx + job_id, job_try, enqueue_time, score
      │    on_job_start        lease.on_job_start: cut the in-progress key to a lease (LEASE_MS)
      │    the job             job.JobDefinition.run: log context, soft/hard limits, retry
      │    │                   policy, failure record, stats
      │    │  ...              meanwhile lease.Leases.renew_forever renews the leases of
      │    │                   every job this process runs (every RENEW_EVERY_S)
      │    on_job_end          lease.on_job_end: stop renewing this job's lease
      │    arq: finish_job     store the result, delete the in-progress key (a cron's stays 60 s)
      │    after_job_end       recycle.after_job_end (recycling workers only): count the job;
      │                        past a limit, once: take no more jobs, let the running ones
      │                        finish, then SIGTERM this process (arq stops at once)
      │
    on_shutdown                shutdown (below): close the stack in reverse (the email
                               batcher's flushes in flight, renewal task, HTTP client, engine)
    arq: close its pool

`startup` either opens everything or, on a failure, closes what it opened and raises: `ctx`
gets the resources in one step, so `shutdown` (which arq calls after a failed startup too)
finds all of them or none.
"""

from __future__ import annotations

import gc
import logging
from contextlib import AsyncExitStack
from typing import Any, cast

import aioboto3

from db.session import create_engine, make_sessionmaker
from jobs.email.batcher import EmailBatcher
from worker.context import Resources, WorkerGiven
from worker.email_providers import make_email_provider
from worker.http import make_http_client
from worker.lease import Leases, renewing, worker_name
from worker.marketing import make_marketing_provider
from worker.preflight import EMAIL_QUEUE, check_redis
from worker.ratelimit import SLIDING_WINDOW_ALLOWANCE_S, RateLimiter
from worker.recycle import Recycler, job_limit, running_worker
from worker.settings import Settings
from worker.storage import make_storage, s3_client_factory

log = logging.getLogger(__name__)


async def startup(arq_ctx: dict[str, Any]) -> None:
    given = cast(WorkerGiven, arq_ctx)
    settings, redis, queue = given["settings"], given["redis"], given["queue_name"]
    # Before anything is opened: a refusal leaves nothing to close.
    await check_redis(redis)
    stack = AsyncExitStack()
    try:
        resources = await _open(stack, given)
    except BaseException:
        await stack.aclose()
        raise
    arq_ctx.update(resources)
    _fit_recycler(resources["recycler"], settings)
    # Imports allocate millions of short-lived rows: default thresholds ran ~10 full
    # collections per 200k rows, each walking every object of the libraries loaded above
    # (up to ~150 ms of blocked loop). Freezing those and collecting less often removed that
    # (bench/bench_import.py: max loop block and rows/s, see README "Imports").
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    log.info(
        "worker ready: queue=%s database=%s",
        queue,
        settings.database.render_as_string(hide_password=True),
    )


async def _open(stack: AsyncExitStack, given: WorkerGiven) -> Resources:
    """Every resource of the worker, each entered into `stack` as it is opened."""
    settings, redis, queue = given["settings"], given["redis"], given["queue_name"]
    # Exports ping each pooled connection at checkout: an export starts over from zero, so a
    # try lost to a connection PostgreSQL dropped while idle (a failover, a terminate burst)
    # costs a whole run and one of MAX_RETRIES. A ping per checkout is nothing next to a COPY;
    # on the default queue it would be two round trips per email, and an import try that
    # committed a batch does not count anyway (InterruptedAfterProgress).
    engine = create_engine(
        settings.database, pooler=settings.database_pooler, pre_ping=queue == "exports"
    )
    stack.push_async_callback(engine.dispose)
    http = await stack.enter_async_context(make_http_client())
    # Only the default queue sends email and must name a provider (preflight.check_settings);
    # imports and exports workers run without one.
    email_provider = None
    if settings.email_provider is not None:
        email_provider = make_email_provider(settings, http)
        if settings.email_provider == "console" and queue == EMAIL_QUEUE:
            log.warning("EMAIL_PROVIDER=console: email is logged here and never sent")
    # A Session holds no connection; storage opens short-lived clients from it (`async with`).
    s3_session = aioboto3.Session()
    return {
        "exit_stack": stack,
        "engine": engine,
        "sessions": make_sessionmaker(engine),
        "http": http,
        "email_provider": email_provider,
        "marketing_provider": make_marketing_provider(settings, http),
        # Shared by every worker process through Redis: the provider's limit is global.
        "email_rate_limiter": RateLimiter(
            redis, settings.email_rate_per_s, window_allowance_s=SLIDING_WINDOW_ALLOWANCE_S
        ),
        "s3_session": s3_session,
        "storage": make_storage(settings, s3_client_factory(s3_session, settings)),
        "leases": await stack.enter_async_context(renewing(Leases(redis, queue))),
        # Closed first (pushed last): its flushes in flight finish on the engine and client.
        "email_batcher": _batcher(stack),
        "recycler": Recycler(
            max_jobs=settings.worker_max_jobs_per_process,
            max_memory_mb=settings.worker_max_memory_mb,
        ),
    }


def _batcher(stack: AsyncExitStack) -> EmailBatcher:
    """The process's email coalescer (jobs/email/batcher.py), named by this process's id."""
    batcher = EmailBatcher(worker_name())
    stack.push_async_callback(batcher.aclose)
    return batcher


def _fit_recycler(recycler: Recycler, settings: Settings) -> None:
    """Scale the recycler's job count to this worker's concurrency and let it drain the worker.

    Only recycling workers (worker.main.worker_settings(recycle=True)) ever consult it.
    """
    worker = running_worker()
    if worker is None:
        log.info("recycling: no arq worker found; a recycle would drain as on SIGTERM")
        return
    recycler.max_jobs = job_limit(settings, worker.max_jobs)
    recycler.attach(worker)


async def shutdown(arq_ctx: dict[str, Any]) -> None:
    # arq calls this after a failed (or refused) startup too: then there is no stack, and
    # nothing is left open (startup closed what it had opened).
    stack = arq_ctx.get("exit_stack")
    if isinstance(stack, AsyncExitStack):
        await stack.aclose()
    log.info("worker stopped: queue=%s", cast(WorkerGiven, arq_ctx)["queue_name"])

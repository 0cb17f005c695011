"""Worker start-up and shutdown: every resource enters one AsyncExitStack, closed in reverse."""

from __future__ import annotations

import gc
import logging
from contextlib import AsyncExitStack
from typing import Any, cast

import aioboto3

from db.session import create_engine, make_sessionmaker
from worker.context import Ctx
from worker.email_providers import make_email_provider
from worker.http import make_http_client
from worker.lease import Leases, renewing
from worker.marketing import make_marketing_provider
from worker.preflight import EMAIL_QUEUE, check_redis
from worker.ratelimit import RateLimiter
from worker.recycle import Recycler
from worker.storage import make_storage, s3_client_factory

log = logging.getLogger(__name__)


async def startup(arq_ctx: dict[str, Any]) -> None:
    ctx = cast(Ctx, arq_ctx)
    settings = ctx["settings"]
    # Before anything is opened: a refusal leaves nothing to close.
    await check_redis(ctx["redis"])
    stack = AsyncExitStack()
    ctx["exit_stack"] = stack
    engine = create_engine(settings.database)
    stack.push_async_callback(engine.dispose)
    ctx["engine"] = engine
    ctx["sessions"] = make_sessionmaker(engine)
    http = await stack.enter_async_context(make_http_client())
    ctx["http"] = http
    # Only the default queue sends email and must name a provider (preflight.check_settings);
    # imports and exports workers run without one.
    if settings.email_provider is not None:
        ctx["email_provider"] = make_email_provider(settings, http)
        if settings.email_provider == "console" and ctx["queue_name"] == EMAIL_QUEUE:
            log.warning("EMAIL_PROVIDER=console: email is logged here and never sent")
    ctx["marketing_provider"] = make_marketing_provider(settings, http)
    # Shared by every worker process through Redis: the provider's limit is global.
    ctx["email_rate_limiter"] = RateLimiter(ctx["redis"], settings.email_rate_limit_per_s)
    # A Session holds no connection; storage opens short-lived clients from it (`async with`).
    s3_session = aioboto3.Session()
    ctx["s3_session"] = s3_session
    ctx["storage"] = make_storage(settings, s3_client_factory(s3_session, settings))
    # Reliability state of this process, read by the arq hooks in worker/lease.py and
    # worker/recycle.py (they see arq's plain dict, so these keys stay out of the typed Ctx).
    leases = Leases(ctx["redis"], ctx["queue_name"])
    arq_ctx["leases"] = await stack.enter_async_context(renewing(leases))
    arq_ctx["recycler"] = Recycler(
        max_jobs=settings.worker_max_jobs_per_process,
        max_memory_mb=settings.worker_max_memory_mb,
    )
    # Imports allocate millions of short-lived rows: default thresholds ran ~10 full
    # collections per 200k rows, each walking every object of the libraries loaded above
    # (up to ~150 ms of blocked loop). Freezing those and collecting less often removed that
    # (bench/bench_import.py: max loop block and rows/s, see README "Imports").
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    log.info(
        "worker ready: queue=%s database=%s",
        ctx["queue_name"],
        settings.database.render_as_string(hide_password=True),
    )


async def shutdown(arq_ctx: dict[str, Any]) -> None:
    ctx = cast(Ctx, arq_ctx)
    stack = ctx.get("exit_stack")
    if stack is not None:
        await stack.aclose()
    log.info("worker stopped: queue=%s", ctx["queue_name"])

"""Worker start-up and shutdown: every resource enters one AsyncExitStack, closed in reverse."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any, cast

import aioboto3
import httpx

from db.session import create_engine, make_sessionmaker
from worker.context import Ctx
from worker.lease import Leases, renewing
from worker.recycle import Recycler

log = logging.getLogger(__name__)


def make_http_client() -> httpx.AsyncClient:
    """The process's one HTTP client; explicit timeouts so a hung provider cannot hold a job."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=15.0, write=15.0, pool=30.0),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
    )


async def startup(arq_ctx: dict[str, Any]) -> None:
    ctx = cast(Ctx, arq_ctx)
    settings = ctx["settings"]
    stack = AsyncExitStack()
    ctx["exit_stack"] = stack
    engine = create_engine(settings)
    stack.push_async_callback(engine.dispose)
    ctx["engine"] = engine
    ctx["sessions"] = make_sessionmaker(engine)
    ctx["http"] = await stack.enter_async_context(make_http_client())
    # A Session holds no connection; jobs open short-lived clients from it (`async with`).
    ctx["s3_session"] = aioboto3.Session()
    # Reliability state of this process, read by the arq hooks in worker/lease.py and
    # worker/recycle.py (they see arq's plain dict, so these keys stay out of the typed Ctx).
    if "redis" in arq_ctx:  # absent only when a test calls startup() by hand
        leases = Leases(ctx["redis"], ctx["queue_name"])
        arq_ctx["leases"] = await stack.enter_async_context(renewing(leases))
    arq_ctx["recycler"] = Recycler(
        max_jobs=settings.worker_max_jobs_per_process,
        max_memory_mb=settings.worker_max_memory_mb,
    )
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

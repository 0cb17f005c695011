"""Test-only jobs for the trace tests, and their routes on the default queue."""

from __future__ import annotations

import httpx

from worker.context import Ctx
from worker.job import job
from worker.routes import Route

ECHO = Route("trace_echo", "default")
FLAKY = Route("trace_flaky", "default")
BROKEN = Route("trace_broken", "default")


@job(name=ECHO.name)
async def echo(ctx: Ctx, key: str) -> str:
    return key


@job(name=FLAKY.name)
async def flaky(ctx: Ctx, key: str) -> str:
    """Fails its first try the way an unreachable provider does (transient), then succeeds."""
    if ctx.get("job_try", 1) == 1:
        raise httpx.ConnectError(f"provider unreachable for {key}")
    return key


@job(name=BROKEN.name)
async def broken(ctx: Ctx, key: str) -> str:
    raise ValueError(f"no such thing as {key}")


TRACE_JOBS = [echo, flaky, broken]

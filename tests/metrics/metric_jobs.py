"""Test-only jobs for real worker processes (`C360_JOB_MODULES=tests.metrics.metric_jobs`)."""

from __future__ import annotations

import asyncio

from worker.context import Ctx
from worker.job import job


@job()
async def nap(ctx: Ctx, seconds: float) -> None:
    """Take at least `seconds`: a lower bound on the try's duration the test can rely on."""
    await asyncio.sleep(seconds)


JOBS = [nap]

"""Worker recycling: after N jobs or above a resident-memory limit, drain and exit cleanly.

Long-lived Python processes fragment memory and keep what leaky libraries hold, which
Celery's `max_tasks_per_child` / `max_memory_per_child` used to reset. arq has no such knob,
so after each job we check the limits and, once, send this process SIGTERM: arq's
`handle_sig_wait_for_completion` (armed because every queue sets `job_completion_wait`) stops
taking jobs, lets the running ones finish within the queue's grace, and the worker exits 0.
`python -m worker run` (or compose's restart policy) starts a fresh process at once.

Each recycle adds one to its queue's field of `c360:recycles` (Redis), before the SIGTERM, so
`/metrics` (`c360_worker_recycles_total{queue}`) counts them across the cluster.

Only workers that handle signals may recycle (`worker_settings(..., recycle=True)`): a test's
in-process worker would otherwise send SIGTERM to the test runner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis

from worker.context import as_ctx
from worker.process_info import resident_bytes

log = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024
RECYCLES_KEY = "c360:recycles"
COUNT_TIMEOUT_S = 2.0


def resident_memory_mb() -> float:
    return resident_bytes() / BYTES_PER_MB


@dataclass
class Recycler:
    max_jobs: int
    max_memory_mb: int
    jobs_done: int = 0
    requested: bool = False

    def reason(self) -> str | None:
        """Why this process should recycle now, or None."""
        if self.jobs_done >= self.max_jobs:
            return f"ran {self.jobs_done} jobs (WORKER_MAX_JOBS_PER_PROCESS={self.max_jobs})"
        memory_mb = resident_memory_mb()
        if memory_mb > self.max_memory_mb:
            return (
                f"resident memory {memory_mb:.0f} MB is above "
                f"WORKER_MAX_MEMORY_MB={self.max_memory_mb}"
            )
        return None

    def job_done(self) -> str | None:
        """Count a finished job; the reason to recycle, once (None before and after that)."""
        self.jobs_done += 1
        if self.requested:
            return None
        reason = self.reason()
        if reason is not None:
            self.requested = True
        return reason

    def recycle(self, reason: str) -> None:
        log.info("recycling this worker: %s; draining running jobs, then exiting", reason)
        # arq's signal handler turns this into a drain; running jobs are not interrupted.
        os.kill(os.getpid(), signal.SIGTERM)


async def count_recycle(redis: Redis | None, queue: str) -> None:
    """Add one to `queue`'s recycles; never fails the caller (a lost count beats a stuck exit)."""
    if redis is None:
        return
    try:
        async with asyncio.timeout(COUNT_TIMEOUT_S):
            # redis-py types hash commands for sync and async clients at once.
            await cast(Awaitable[int], redis.hincrby(RECYCLES_KEY, queue, 1))
    except Exception as exc:
        log.warning("could not count this recycle: %s", exc)


async def after_job_end(arq_ctx: dict[str, Any]) -> None:
    """arq hook, after the job's result is stored: count it and recycle when a limit is hit."""
    ctx = as_ctx(arq_ctx)
    try:
        reason = ctx["recycler"].job_done()
    except Exception:
        # psutil failing must not crash the worker's job task.
        log.exception("recycling check failed")
        return
    if reason is not None:
        await count_recycle(ctx["redis"], ctx["queue_name"])
        ctx["recycler"].recycle(reason)

"""Worker recycling: after N jobs or above a resident-memory limit, drain and exit cleanly.

Long-lived Python processes fragment memory and keep what leaky libraries hold, which
Celery's `max_tasks_per_child` / `max_memory_per_child` used to reset. arq has no such knob,
so after each job we check the limits and, once, send this process SIGTERM: arq's
`handle_sig_wait_for_completion` (armed because every queue sets `job_completion_wait`) stops
taking jobs, lets the running ones finish within the queue's grace, and the worker exits 0.
`python -m worker run` (or compose's restart policy) starts a fresh process at once.

Only workers that handle signals may recycle (`worker_settings(..., recycle=True)`): a test's
in-process worker would otherwise send SIGTERM to the test runner.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import psutil

from worker.context import as_ctx

log = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024


def resident_memory_mb() -> float:
    return psutil.Process().memory_info().rss / BYTES_PER_MB


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

    def job_done(self) -> None:
        self.jobs_done += 1
        if self.requested:
            return
        reason = self.reason()
        if reason is None:
            return
        self.requested = True
        log.info("recycling this worker: %s; draining running jobs, then exiting", reason)
        # arq's signal handler turns this into a drain; running jobs are not interrupted.
        os.kill(os.getpid(), signal.SIGTERM)


async def after_job_end(arq_ctx: dict[str, Any]) -> None:
    """arq hook, after the job's result is stored: count it and recycle when a limit is hit."""
    try:
        as_ctx(arq_ctx)["recycler"].job_done()
    except Exception:
        # psutil failing must not crash the worker's job task.
        log.exception("recycling check failed")

"""Worker recycling: past a job count or a resident-memory limit, stop taking jobs, finish, exit.

Long-lived Python processes fragment memory and keep what leaky libraries hold, which
Celery's `max_tasks_per_child` / `max_memory_per_child` used to reset. arq has no such knob,
so after each job we check the limits and, once, start a drain:

- this process stops taking jobs (arq's `allow_pick_jobs`) but keeps polling, so heartbeats,
  aborts (cancel_import) and lease renewals go on;
- the jobs it runs finish on their own, however long: a campaign tick, an export or an import
  is never cut by a routine recycle (a cancelled SendGrid page would hold its in-flight sends
  for `review`, an export would start again from zero). Each job's own hard time limit bounds
  the wait, and the drain gives up at the longest of them (`drain_limit_s`);
- only a runaway process is cut sooner: resident memory above `cut_above_mb` (twice the limit,
  and a whole limit above where it stood when the drain began, since a process that takes no
  jobs should only shrink) ends the drain the way SIGTERM does (the queue's grace, then the
  running jobs are cancelled back to the queue);
- then the process sends itself SIGTERM: arq's handler finds nothing running and the worker
  exits 0. `python -m worker run` has meanwhile started the replacement (it is told through
  `DRAINING_FD_ENV` as the drain starts), so the queue is served throughout; compose's restart
  policy starts one when the process exits.

An operator's SIGTERM during a drain is the usual graceful shutdown (grace, then cancel).

The count fits the queue: WORKER_MAX_JOBS_PER_PROCESS left unset counts per concurrent job
slot (`job_limit`), so the default queue (200 at once) recycles after 200,000 jobs, not every
few seconds; set, it is the per-process count on every queue, as an operator wrote it.

Each recycle adds one to its queue's field of `c360:recycles` (Redis), so `/metrics`
(`c360_worker_recycles_total{queue}`) counts them across the cluster.

Only workers that handle signals may recycle (`worker_settings(..., recycle=True)`): a test's
in-process worker would otherwise send SIGTERM to the test runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast

from arq.worker import Worker
from redis.asyncio import Redis

from worker.context import as_ctx
from worker.process_info import resident_bytes
from worker.settings import Settings

log = logging.getLogger(__name__)

BYTES_PER_MB = 1024 * 1024
RECYCLES_KEY = "c360:recycles"
COUNT_TIMEOUT_S = 2.0
DRAIN_CHECK_EVERY_S = 0.5
# A draining process that grows this many times past its limit is a runaway, not a busy job.
CUT_MEMORY_FACTOR = 2
# `python -m worker run` passes each worker the write end of a pipe under this name; a byte
# written there says "draining: start my replacement now", and why: the memory limit (which
# the supervisor watches for a limit set below what a worker needs) or anything else.
DRAINING_FD_ENV = "C360_DRAINING_FD"
DRAINING_BY_MEMORY = b"m"
DRAINING_BY_COUNT = b"d"


def resident_memory_mb() -> float:
    return resident_bytes() / BYTES_PER_MB


def job_limit(settings: Settings, concurrency: int) -> int:
    """Jobs one process runs before it recycles, on a queue running `concurrency` at once.

    CONTRACT §3's default (1,000) counts per concurrent job slot: a per-process 1,000 recycled
    the default queue (200 at once, ~250 sends/s) every 4 s. An operator's explicit value is
    taken as written, per process, on every queue.
    """
    if "worker_max_jobs_per_process" in settings.model_fields_set:
        return settings.worker_max_jobs_per_process
    return settings.worker_max_jobs_per_process * concurrency


def running_worker() -> Worker | None:
    """The arq Worker whose start-up hook is running, or None outside one.

    arq hands its hooks only the ctx dict; `on_startup` runs inside `Worker.main`, the
    worker's main task, whose coroutine holds the worker. Checked, not assumed.
    """
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    candidate = frame.f_locals.get("self") if frame is not None else None
    if isinstance(candidate, Worker) and candidate.main_task is task:
        return candidate
    return None


@dataclass
class Recycler:
    max_jobs: int
    max_memory_mb: int
    jobs_done: int = 0
    requested: bool = False
    # Whether the drain was started by the memory limit rather than the job count.
    by_memory: bool = False
    # The worker to drain; None (not found): recycling falls back to a SIGTERM drain.
    worker: Worker | None = None
    drain_limit_s: float = 0.0
    _drain: asyncio.Task[None] | None = field(default=None, repr=False)

    def attach(self, worker: Worker) -> None:
        self.worker = worker
        # Every function's arq timeout is its hard limit plus a little: no job outlives it.
        self.drain_limit_s = max(
            (f.timeout_s or worker.job_timeout_s for f in worker.functions.values()),
            default=worker.job_timeout_s,
        )

    def reason(self) -> str | None:
        """Why this process should recycle now, or None."""
        if self.jobs_done >= self.max_jobs:
            return f"ran {self.jobs_done} jobs (WORKER_MAX_JOBS_PER_PROCESS: {self.max_jobs})"
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
            # reason() checks the count first: below it, memory was the cause.
            self.by_memory = self.jobs_done < self.max_jobs
        return reason

    def cut_above_mb(self, memory_at_start_mb: float) -> float:
        """Resident memory at which a drain stops waiting for its jobs."""
        return max(CUT_MEMORY_FACTOR * self.max_memory_mb, memory_at_start_mb + self.max_memory_mb)

    def recycle(self, reason: str) -> None:
        worker = self.worker
        if worker is None:
            log.info("recycling this worker: %s; draining as on SIGTERM", reason)
            _stop_like_sigterm()
            return
        # Not counting the job whose end hook is calling: it has finished.
        this = asyncio.current_task()
        running = sum(not task.done() and task is not this for task in worker.tasks.values())
        log.info(
            "recycling this worker: %s; taking no more jobs, %d running may finish first",
            reason,
            running,
        )
        worker.allow_pick_jobs = False
        _tell_supervisor_draining(DRAINING_BY_MEMORY if self.by_memory else DRAINING_BY_COUNT)
        # A context of its own: not the log context or trace span of the job that ended last.
        self._drain = asyncio.create_task(
            self._drain_then_exit(worker), name="c360-recycle", context=contextvars.Context()
        )

    async def _drain_then_exit(self, worker: Worker) -> None:
        try:
            await self._wait_for_running_jobs(worker)
        except Exception:
            log.exception("recycling: the drain failed; stopping as on SIGTERM")
        # arq's own shutdown from here: with nothing running it stops at once (a cut above
        # gives the rest the queue's grace, then cancels them back to the queue).
        _stop_like_sigterm()

    async def _wait_for_running_jobs(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.drain_limit_s
        cut_above_mb = self.cut_above_mb(resident_memory_mb())
        while any(not task.done() for task in worker.tasks.values()):
            memory_mb = resident_memory_mb()
            if memory_mb > cut_above_mb:
                log.warning(
                    "recycling: resident memory %.0f MB passed %.0f MB while draining; "
                    "cancelling the running jobs after the grace period",
                    memory_mb,
                    cut_above_mb,
                )
                return
            if loop.time() > give_up_at:
                log.warning("recycling: jobs still running after %.0f s", self.drain_limit_s)
                return
            await asyncio.sleep(DRAIN_CHECK_EVERY_S)


def _stop_like_sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _tell_supervisor_draining(why: bytes) -> None:
    raw_fd = os.environ.get(DRAINING_FD_ENV, "")
    if not raw_fd.isdigit():
        return
    # A supervisor gone or a pipe closed only means no early replacement.
    with contextlib.suppress(OSError):
        os.write(int(raw_fd), why)


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

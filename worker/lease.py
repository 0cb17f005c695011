"""Short, renewed in-progress leases: a killed worker's job runs again within seconds, not minutes.

arq marks a running job with `arq:in-progress:<id>` for the longest job timeout of the worker
plus 10 s (`Worker.in_progress_timeout_s`), and no other worker starts the job while that key
lives. A SIGKILLed import would wait ~30 minutes. We keep the key short instead:

- `on_job_start` cuts it to `LEASE_MS` before the job's code runs and remembers the job;
- a renewal task (started in `lifecycle.startup`) extends the leases of this process's running
  jobs every `RENEW_EVERY_S`; a dead process renews nothing, so its jobs free up in <= 15 s;
- `on_job_end` forgets the job; arq's `finish_job` then deletes the key (or, for cron jobs,
  keeps it `keep_cronjob_progress` = 60 s so the tick does not run twice). Renewals use
  `PEXPIRE ... GT`, which never shortens that longer keep nor recreates a deleted key.

`c360:running:<queue>` (job id -> JSON with worker and lease expiry) mirrors the leases for
`python -m worker status`; entries of dead workers are recognisable by their past expiry.

`c360:workers` lists every worker process by its heartbeat key (`health_check_key`), scored by
when the process last said so (at start and with each renewal): `status` and the console find
the live workers there instead of SCANning the keyspace, which at 10^5 queued jobs blocked
Redis ~200 ms per look (bench/bench_console.py). Each renewal also drops entries no process
refreshed within `WORKER_SEEN_WINDOW_MS`, i.e. those of killed processes. The same round trip
refreshes this process's own hash (worker/process_info.py: start time, RSS), so the workers page
needs no timer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Worker

from worker import process_info
from worker.context import as_ctx

log = logging.getLogger(__name__)

LEASE_MS = 15_000
# Three renewals per lease: one slow Redis round trip or a busy loop does not lose the lease.
RENEW_EVERY_S = 5.0
RUNNING_KEY_PREFIX = "c360:running:"
WORKERS_KEY = "c360:workers"
# Twelve renewal periods: a busy loop or a slow Redis does not drop a live worker's entry.
WORKER_SEEN_WINDOW_MS = 60_000


def running_key(queue: str) -> str:
    return RUNNING_KEY_PREFIX + queue


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def health_check_key(queue: str) -> str:
    """arq's heartbeat key of this process: one per process, so every live worker is listed."""
    return f"{queue}:health-check:{worker_name()}"


def shorten_initial_claim(worker: Worker) -> None:
    """Make arq's own claim (its `psetex` in `start_jobs`) a lease too.

    Without this, a worker killed between arq's claim and `on_job_start` (a few ms) leaves
    the long key. arq reads this attribute only when it claims a job.
    """
    if not hasattr(worker, "in_progress_timeout_s"):  # pragma: no cover - arq changed shape
        raise RuntimeError("arq.Worker.in_progress_timeout_s is gone; review worker/lease.py")
    worker.in_progress_timeout_s = LEASE_MS / 1000


class Leases:
    """The leases of the jobs this process runs on one queue."""

    def __init__(self, redis: ArqRedis, queue: str) -> None:
        self.redis = redis
        self.queue = queue
        self.worker = worker_name()
        self.started_ms: dict[str, int] = {}
        self.process_started_ms = int(time.time() * 1000)
        # Serialises renewals with releases, so a renewal never re-adds a finished job's entry.
        self._lock = asyncio.Lock()

    def _entry(self, job_id: str, now_ms: int) -> str:
        return json.dumps(
            {
                "worker": self.worker,
                "started_ms": self.started_ms[job_id],
                "lease_until_ms": now_ms + LEASE_MS,
            }
        )

    async def acquire(self, job_id: str) -> None:
        now_ms = int(time.time() * 1000)
        self.started_ms[job_id] = now_ms
        async with self._lock, self.redis.pipeline(transaction=False) as pipe:
            # A plain PEXPIRE: arq's claim may be the long default (workers built by arq's CLI).
            pipe.pexpire(in_progress_key_prefix + job_id, LEASE_MS)
            pipe.hset(running_key(self.queue), job_id, self._entry(job_id, now_ms))
            await pipe.execute()

    async def release(self, job_id: str) -> None:
        async with self._lock:
            self.started_ms.pop(job_id, None)
            # redis-py types hash commands for sync and async clients at once.
            await cast(Awaitable[int], self.redis.hdel(running_key(self.queue), job_id))

    async def renew(self) -> int:
        """Extend every lease this process holds; the number renewed."""
        async with self._lock:
            now_ms = int(time.time() * 1000)
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in self.started_ms:
                    pipe.pexpire(in_progress_key_prefix + job_id, LEASE_MS, gt=True)
                if self.started_ms:
                    pipe.hset(
                        running_key(self.queue),
                        mapping={job: self._entry(job, now_ms) for job in self.started_ms},
                    )
                await pipe.execute()
            return len(self.started_ms)

    async def announce(self) -> None:
        """List this process (and its start time and RSS); drop processes gone silent."""
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(WORKERS_KEY, {health_check_key(self.queue): now_ms})
            pipe.zremrangebyscore(WORKERS_KEY, "-inf", now_ms - WORKER_SEEN_WINDOW_MS)
            process_info.describe(pipe, self.worker, self.queue, self.process_started_ms)
            await pipe.execute()

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self.announce()
                await self.renew()
            except Exception as exc:
                # Redis away: arq's own loop fails too and the process restarts; until then
                # keep trying, a lease renewed late is still better than none.
                log.warning("could not renew job leases: %s", exc)


@contextlib.asynccontextmanager
async def renewing(leases: Leases) -> AsyncIterator[Leases]:
    """Run the renewal task for as long as the worker runs (entered in `lifecycle.startup`)."""
    await leases.announce()
    task = asyncio.create_task(leases.renew_forever(), name="c360-lease-renewal")
    try:
        yield leases
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await leases.redis.zrem(WORKERS_KEY, health_check_key(leases.queue))
        except Exception as exc:  # the entry then ages out of WORKER_SEEN_WINDOW_MS
            log.warning("could not remove this worker from %s: %s", WORKERS_KEY, exc)


async def on_job_start(arq_ctx: dict[str, Any]) -> None:
    """arq hook: take the short lease before the job's code runs."""
    ctx = as_ctx(arq_ctx)
    try:
        await ctx["leases"].acquire(ctx["job_id"])
    except Exception as exc:
        # The job is remembered, so the next renewal retries; never fail a job over this.
        log.warning("could not shorten the lease of %s: %s", ctx["job_id"], exc)


async def on_job_end(arq_ctx: dict[str, Any]) -> None:
    """arq hook (before arq's finish_job): stop renewing the job's lease."""
    ctx = as_ctx(arq_ctx)
    try:
        await ctx["leases"].release(ctx["job_id"])
    except Exception as exc:
        log.warning("could not release the lease of %s: %s", ctx["job_id"], exc)

"""`run`: a small supervisor that keeps one worker process per queue alive.

Each worker is a child process (`python -m worker work QUEUE`), so a worker that recycles
itself (job count, memory) or crashes is replaced at once while the others keep going. A
recycling worker says so as it stops taking jobs (a byte on a pipe, worker/recycle.py), and
its replacement starts then, while it finishes its running jobs. SIGTERM/SIGINT are passed on
to every child, draining ones too, which finish within their grace and exit; then `run` exits.

Recycling cannot pile up processes (each holds a database pool): at most
`MAX_DRAINING_PER_QUEUE` children of a queue drain at once, and the replacement of one more
waits until one of them has exited. A worker that passes WORKER_MAX_MEMORY_MB within
`FAST_DRAIN_S` of its start (the limit is below what a worker holds at rest, so every worker
would drain after its first job) gets its replacement after a growing delay, and one error
in the log names the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

import redis.exceptions
from arq.worker import Worker

from worker import preflight
from worker.lease import shorten_initial_claim
from worker.main import worker_settings
from worker.recycle import DRAINING_BY_MEMORY, DRAINING_FD_ENV
from worker.redis_connect import arq_pool, describe, redis_client
from worker.routes import QUEUES
from worker.settings import Settings

log = logging.getLogger(__name__)
# A child that dies faster than this after starting is crash-looping: back off before the next.
FAST_EXIT_S = 5.0
MAX_RESTART_DELAY_S = 30.0
# Recycling children of one queue that may still be finishing their jobs at once.
MAX_DRAINING_PER_QUEUE = 2
# A worker past its memory limit this soon after its start was over it from the start: a
# worker takes a few seconds to boot (more on a loaded host), and a limit hit by real work
# takes longer than this to reach.
FAST_DRAIN_S = 30.0
PREFLIGHT_TIMEOUT_S = 5.0


def register(subparsers: Any) -> None:
    run = subparsers.add_parser("run", help="run workers for all queues (or one) until stopped")
    run.add_argument("--queue", choices=sorted(QUEUES), help="only this queue")
    run.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    run.set_defaults(handler=run_supervisor)
    work = subparsers.add_parser("work", help="run one worker in this process (used by `run`)")
    work.add_argument("queue", choices=sorted(QUEUES))
    work.add_argument("--burst", action="store_true")
    work.set_defaults(handler=run_worker)


async def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    config = worker_settings(args.queue, settings, burst=args.burst, recycle=True)
    try:
        # Ours rather than arq's create_pool: through Sentinel, arq's sets no timeouts.
        pool = await arq_pool(settings, queue=args.queue)
    except (redis.exceptions.RedisError, OSError) as exc:
        log.error("cannot reach Redis (%s): %s", describe(settings), exc)
        return 1
    worker = Worker(**config, redis_pool=pool)
    shorten_initial_claim(worker)
    try:
        await worker.async_run()
    except asyncio.CancelledError:
        pass  # arq cancels its main task on SIGTERM once running jobs are drained
    except preflight.StartupRefused:
        # Close its Redis pool (startup opened nothing else before refusing), then say why.
        with contextlib.suppress(redis.exceptions.RedisError):
            await worker.close()
        raise
    except redis.exceptions.RedisError as exc:
        # arq's poll loop does not reconnect. Stop the jobs (they resume on their next pickup,
        # once their leases run out) and exit; the supervisor or compose restarts the worker.
        log.error("lost Redis (%s); exiting so a fresh worker reconnects", exc)
        for task in worker.tasks.values():
            task.cancel()
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        with contextlib.suppress(redis.exceptions.RedisError):
            await worker.close()
        return 1
    await worker.close()
    return 0


class _Child:
    """One worker process, and whether it said it drains (recycle.DRAINING_FD_ENV)."""

    def __init__(self, process: asyncio.subprocess.Process, draining_fd: int) -> None:
        self.process = process
        self.draining = asyncio.Event()
        self.by_memory = False  # what the child said started its drain
        self._fd = draining_fd
        asyncio.get_running_loop().add_reader(draining_fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, 64)
        except OSError:
            data = b""
        if data:
            self.by_memory = DRAINING_BY_MEMORY in data
            self.draining.set()
        else:  # the child exited (or closed its end): nothing more will come
            self.close_pipe()

    def close_pipe(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


async def _spawn(queue: str, burst: bool) -> _Child:
    command = [sys.executable, "-m", "worker", "work", queue, *(["--burst"] if burst else [])]
    read_fd, write_fd = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *command, pass_fds=(write_fd,), env=os.environ | {DRAINING_FD_ENV: str(write_fd)}
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child holds its copy; EOF here once it exits
    log.info("started %s worker pid=%d", queue, process.pid)
    return _Child(process, read_fd)


async def _finish_draining(
    queue: str, child: _Child, draining: dict[_Child, asyncio.Task[None]]
) -> None:
    try:
        code = await child.process.wait()
        log.info(
            "%s worker pid=%d finished draining, exited with %d", queue, child.process.pid, code
        )
    finally:
        child.close_pipe()
        draining.pop(child, None)


async def _make_room(
    queue: str, draining: dict[_Child, asyncio.Task[None]], delay_s: float, stopping: asyncio.Event
) -> bool:
    """Wait `delay_s`, and until at most MAX_DRAINING_PER_QUEUE children drain; True: stopping."""
    loop = asyncio.get_running_loop()
    until_s = loop.time() + delay_s
    said = False
    while True:
        remaining_s = until_s - loop.time()
        crowded = len(draining) > MAX_DRAINING_PER_QUEUE
        if remaining_s <= 0 and not crowded:
            return False
        if crowded and not said:
            log.warning(
                "%s: %d workers are still finishing their jobs after recycling; the next "
                "starts when one of them exits (MAX_DRAINING_PER_QUEUE=%d)",
                queue,
                len(draining),
                MAX_DRAINING_PER_QUEUE,
            )
            said = True
        stopper = asyncio.ensure_future(stopping.wait())
        # The draining tasks are only watched here, never cancelled.
        watched: set[asyncio.Future[Any]] = {stopper, *(draining.values() if crowded else ())}
        await asyncio.wait(
            watched, timeout=max(remaining_s, 0) or None, return_when=asyncio.FIRST_COMPLETED
        )
        stopper.cancel()
        if stopping.is_set():
            return True


async def _supervise_queue(
    queue: str, burst: bool, stopping: asyncio.Event, max_memory_mb: int
) -> int:
    restart_delay_s = 1.0
    # Replacements of workers that passed their memory limit right after starting.
    fast_drain_delay_s = 1.0
    # Recycled workers still finishing their jobs while their replacement serves the queue.
    draining: dict[_Child, asyncio.Task[None]] = {}
    try:
        while True:
            started_s = time.monotonic()
            child = await _spawn(queue, burst)
            waiter = asyncio.ensure_future(child.process.wait())
            drained = asyncio.ensure_future(child.draining.wait())
            stopper = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({waiter, drained, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            drained.cancel()
            if stopping.is_set() and not waiter.done():
                child.process.send_signal(signal.SIGTERM)
            if child.draining.is_set() and not waiter.done() and not stopping.is_set():
                # A recycle: it takes no more jobs and may run a long one to its end; its
                # replacement starts now so the queue is served meanwhile.
                waiter.cancel()
                draining[child] = asyncio.create_task(_finish_draining(queue, child, draining))
                restart_delay_s = 1.0
                drained_after_s = time.monotonic() - started_s
                delay_s = 0.0
                if child.by_memory and drained_after_s < FAST_DRAIN_S:
                    if fast_drain_delay_s == 1.0:  # the first of a run of them: say it once
                        log.error(
                            "%s worker pid=%d passed WORKER_MAX_MEMORY_MB=%d %.0f s after it "
                            "started: the limit is below what a worker holds at rest, so each "
                            "would recycle after its first job; raise WORKER_MAX_MEMORY_MB. "
                            "Replacements start after a growing delay (up to %.0f s) meanwhile",
                            queue,
                            child.process.pid,
                            max_memory_mb,
                            drained_after_s,
                            MAX_RESTART_DELAY_S,
                        )
                    delay_s = fast_drain_delay_s
                    fast_drain_delay_s = min(fast_drain_delay_s * 2, MAX_RESTART_DELAY_S)
                else:
                    fast_drain_delay_s = 1.0
                log.info(
                    "%s worker pid=%d is recycling; replacing it in %.0f s",
                    queue,
                    child.process.pid,
                    delay_s,
                )
                if await _make_room(queue, draining, delay_s, stopping):
                    return 0
                continue
            code = await waiter
            child.close_pipe()
            if burst or stopping.is_set():
                return code
            if time.monotonic() - started_s < FAST_EXIT_S and code != 0:
                log.error(
                    "%s worker exited with %d right after start; retry in %.0f s",
                    queue,
                    code,
                    restart_delay_s,
                )
                try:
                    await asyncio.wait_for(stopping.wait(), restart_delay_s)
                    return code
                except TimeoutError:
                    restart_delay_s = min(restart_delay_s * 2, MAX_RESTART_DELAY_S)
            else:
                restart_delay_s = 1.0
                log.info(
                    "%s worker pid=%d exited with %d; replacing it", queue, child.process.pid, code
                )
    finally:
        # Stopping: the draining ones get SIGTERM too (the usual graceful shutdown).
        for old in list(draining):
            with contextlib.suppress(ProcessLookupError):
                old.process.send_signal(signal.SIGTERM)
        if draining:
            await asyncio.gather(*draining.values(), return_exceptions=True)


async def run_supervisor(args: argparse.Namespace, settings: Settings) -> int:
    queues = [args.queue] if args.queue else list(QUEUES)
    # The children would refuse too, but one line here beats a crash-looping child per queue.
    for queue in queues:
        preflight.check_settings(queue, settings)
    client = redis_client(settings, timeout_s=PREFLIGHT_TIMEOUT_S)
    try:
        await preflight.check_redis(client)
    except redis.exceptions.ConnectionError as exc:
        # Not up yet: start anyway, as before; each worker checks the version when it connects.
        log.warning("Redis not reachable (%s); the workers will wait for it", exc)
    finally:
        await client.aclose()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    codes = await asyncio.gather(
        *(_supervise_queue(q, args.burst, stopping, settings.worker_max_memory_mb) for q in queues)
    )
    return max(codes, default=0)

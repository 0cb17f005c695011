"""Real `python -m worker work QUEUE` processes, each kept alive by a restart loop of ours.

Not `python -m worker run`: the soak must know each worker's pid to SIGKILL it, and count how
each one ended (killed by us, recycled with exit 0, or exited 1 after losing Redis). The loop
behaves as `run`'s supervisor does: a worker that exits is replaced after a second, one that
fails right after starting (Redis down) is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from bench.chaos.env import ROOT
from worker.lease import running_key

# Two imports workers (2 slots each), two exports workers (4 slots each), two default workers
# (200 slots each): every queue keeps serving while one of its workers is dead.
WORKERS_PER_QUEUE = {"imports": 2, "exports": 2, "default": 2}
# The second exports worker writes to the local disk, the first to S3: an export lands on
# either (its row records where), so a kill mid-write can leave a temporary file as well as
# an open multipart upload, and the checks look for both.
SLOT_ENV = {("exports", 1): {"STORAGE_BACKEND": "local"}}
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 8.0
FAST_EXIT_S = 5.0
STOP_GRACE_S = 30.0
KILL_WAIT_S = 15.0


@dataclass
class Slot:
    queue: str
    index: int
    process: asyncio.subprocess.Process | None = None
    killed_pids: set[int] = field(default_factory=set)


async def _busy_pids(redis: aioredis.Redis, queue: str) -> set[int]:
    """Pids of the workers holding a live lease on `queue` (worker/lease.py's mirror)."""
    try:
        entries = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(running_key(queue)))
    except redis_errors.RedisError:
        return set()  # Redis is down: any worker will do
    now_ms = time.time() * 1000
    return {
        int(entry["worker"].rpartition(":")[2])
        for entry in map(json.loads, entries.values())
        if entry.get("lease_until_ms", 0) > now_ms
    }


class WorkerPool:
    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.slots = [
            Slot(queue, index)
            for queue, count in WORKERS_PER_QUEUE.items()
            for index in range(count)
        ]
        self.exits: Counter[str] = Counter()  # "sigkill by chaos", "recycled (exit 0)", ...
        self.starts = 0
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._kill_order: list[str] = []
        self._kills = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep_alive(slot)) for slot in self.slots]

    async def _keep_alive(self, slot: Slot) -> None:
        delay_s = RESTART_DELAY_S
        while not self._stopping.is_set():
            log_path = self.log_dir / f"{slot.queue}-{slot.index}-{self.starts}.log"
            with log_path.open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "worker", "work", slot.queue,
                    env=self.env, cwd=ROOT, stdout=log, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            self.starts += 1
            slot.process = process
            started_s = time.monotonic()
            code = await process.wait()
            slot.process = None
            if self._stopping.is_set():
                return
            self.exits[self._why(slot, process.pid, code)] += 1
            fast_failure = code != 0 and time.monotonic() - started_s < FAST_EXIT_S
            delay_s = min(delay_s * 2, MAX_RESTART_DELAY_S) if fast_failure else RESTART_DELAY_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay_s)

    @staticmethod
    def _why(slot: Slot, pid: int, code: int) -> str:
        if pid in slot.killed_pids:
            return "SIGKILL by the soak"
        if code == 0:
            return "exit 0 (recycled)"
        if code == -signal.SIGKILL:
            return "SIGKILL (not ours: out of memory?)"
        return f"exit {code} (lost Redis or crashed)"

    async def kill_one(self, rng: random.Random, redis: aioredis.Redis) -> str | None:
        """SIGKILL one live worker, preferring one that holds a job lease (it is mid-job).

        The queues take turns, in an order drawn once: the kill goes to a busy worker of this
        turn's queue if one appears within KILL_WAIT_S, else to the first queue from this turn's
        on that has a busy worker, else to an idle worker of this turn's queue.
        """
        if not self._kill_order:
            self._kill_order = sorted({slot.queue for slot in self.slots})
            rng.shuffle(self._kill_order)
        turns = [
            self._kill_order[(self._kills + turn) % len(self._kill_order)]
            for turn in range(len(self._kill_order))
        ]
        self._kills += 1
        # Imports and exports run in short spells between idle ones: give this turn's queue a
        # few seconds to start a job, so their resume paths get killed too, not only email.
        deadline_s = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline_s:
            busy_pids = await _busy_pids(redis, turns[0])
            busy = [
                s
                for s in self.slots
                if s.queue == turns[0] and s.process is not None and s.process.pid in busy_pids
            ]
            if busy:
                return self._kill(rng.choice(busy), "running a job")
            await asyncio.sleep(0.5)
        fallback: Slot | None = None
        for queue in turns:
            live = [s for s in self.slots if s.queue == queue and s.process is not None]
            busy_pids = await _busy_pids(redis, queue)
            busy = [s for s in live if s.process is not None and s.process.pid in busy_pids]
            if busy:
                return self._kill(rng.choice(busy), "running a job")
            if fallback is None and live:
                fallback = rng.choice(live)
        return None if fallback is None else self._kill(fallback, "idle")

    @staticmethod
    def _kill(slot: Slot, state: str) -> str:
        assert slot.process is not None
        slot.killed_pids.add(slot.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.process.pid, signal.SIGKILL)
        return f"{slot.queue} worker pid {slot.process.pid} ({state})"

    async def stop(self) -> None:
        """SIGTERM every live worker (they drain), SIGKILL what is left after the grace."""
        self._stopping.set()
        live = [slot.process for slot in self.slots if slot.process is not None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), STOP_GRACE_S)
        for process in live:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)

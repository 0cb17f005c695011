"""Carry out the seeded fault plan (bench/chaos/workload.py) against the soak's own processes.

`pg_terminate_backend` goes through a connection to the `postgres` database and only ever
names backends `WHERE datname = <the soak's database>`; the Redis restart is the soak's own
redis-server. Each fault is logged with its time, so a failed invariant can be lined up
against what was done when.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import asyncpg
import redis.asyncio as aioredis

from bench.chaos.env import PG_SERVER, Environment
from bench.chaos.workers import WorkerPool
from bench.chaos.workload import (
    PG_BURST_GAP_S,
    PG_BURST_ROUNDS,
    REDIS_DOWN_S,
    Fault,
)

TERMINATE = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE datname = $1 AND pid <> pg_backend_pid()"
)


class Injector:
    def __init__(self, env: Environment, pool: WorkerPool, seed: int) -> None:
        self.env = env
        self.pool = pool
        self.rng = random.Random(seed ^ 0xFA17)
        self.counts: Counter[str] = Counter()
        self.terminated_backends = 0
        self.log: list[str] = []

    def note(self, started_s: float, text: str) -> None:
        line = f"[{time.monotonic() - started_s:6.1f} s] {text}"
        self.log.append(line)
        print(line, flush=True)

    async def run(self, plan: tuple[Fault, ...], started_s: float) -> None:
        admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
        try:
            for fault in plan:
                await asyncio.sleep(max(0.0, started_s + fault.at_s - time.monotonic()))
                await self._inject(fault, admin, started_s)
        finally:
            await admin.close()

    async def _inject(self, fault: Fault, admin: asyncpg.Connection, started_s: float) -> None:
        if fault.kind == "worker_sigkill":
            redis = aioredis.Redis.from_url(self.env.redis.url, socket_timeout=2)
            try:
                victim = await self.pool.kill_one(self.rng, redis)
            finally:
                await redis.aclose()
            if victim is None:
                self.note(started_s, "worker SIGKILL skipped: no worker alive")
                return
            self.counts[fault.kind] += 1
            self.note(started_s, f"SIGKILL {victim}")
        elif fault.kind == "pg_terminate_burst":
            terminated = 0
            for _ in range(PG_BURST_ROUNDS):
                terminated += await admin.fetchval(TERMINATE, self.env.database)
                await asyncio.sleep(PG_BURST_GAP_S)
            self.counts[fault.kind] += 1
            self.terminated_backends += terminated
            self.note(started_s, f"pg_terminate_backend burst: {terminated} backends")
        else:
            self.env.redis.kill()
            self.note(started_s, f"redis-server kill -9; down for {REDIS_DOWN_S:g} s")
            await asyncio.sleep(REDIS_DOWN_S)
            await self.env.redis.start()
            self.counts[fault.kind] += 1
            self.note(started_s, "redis-server started again, empty")

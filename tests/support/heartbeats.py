"""A live worker's heartbeat, for tests that need one without running a worker process."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from worker.lease import WORKERS_KEY


async def fake_heartbeat(redis: aioredis.Redis, key: str, info: bytes | str, ttl_ms: int) -> None:
    """What a worker leaves: arq's health-check `key` (`QUEUE:health-check:HOST:PID`) and the
    process's entry in the worker registry (worker/lease.py)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(key, info, px=ttl_ms)
        pipe.zadd(WORKERS_KEY, {key: int(time.time() * 1000)})
        await pipe.execute()

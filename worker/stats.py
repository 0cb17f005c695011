"""Counters and recent failures our job wrapper keeps in Redis, for `python -m worker status`.

- `c360:stats:<queue>`: hash of `completed`, `failed`, `retried` (Retry or requeued after a
  shutdown cancel) and `died` (tries whose worker died, seen at the next try);
- `c360:failures`: the last `MAX_FAILURES` failures, newest first, as JSON;
- `c360:unfinished:<job id>`: tries of one job that started and did not end through our code,
  i.e. whose worker died. It tells a poison pill ("the worker died N times") from a job that
  merely used its retries.

Bookkeeping never fails a job: every call here swallows and logs its own errors, within a short
time bound so that a stalled Redis does not hold the job either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any, Literal, cast

from redis.asyncio import Redis

log = logging.getLogger(__name__)

STATS_KEY_PREFIX = "c360:stats:"
FAILURES_KEY = "c360:failures"
UNFINISHED_KEY_PREFIX = "c360:unfinished:"
MAX_FAILURES = 100
# Same lifetime as arq's own retry counter (arq.worker: `expire(retry_key, 88400)`).
UNFINISHED_TTL_S = 88_400
BOOKKEEPING_TIMEOUT_S = 2.0

Outcome = Literal["completed", "failed", "retried"]


def stats_key(queue: str) -> str:
    return STATS_KEY_PREFIX + queue


async def record(
    redis: Redis | None,
    queue: str,
    outcome: Outcome,
    *,
    job_id: str = "-",
    job: str = "-",
    job_try: int = 1,
    error: str | None = None,
) -> None:
    if redis is None:
        return
    try:
        async with asyncio.timeout(BOOKKEEPING_TIMEOUT_S), redis.pipeline() as pipe:
            pipe.hincrby(stats_key(queue), outcome, 1)
            if outcome == "failed":
                failure = {
                    "at_s": round(time.time(), 3),
                    "queue": queue,
                    "job_id": job_id,
                    "job": job,
                    "try": job_try,
                    "error": (error or "")[:2000],
                }
                pipe.lpush(FAILURES_KEY, json.dumps(failure))
                pipe.ltrim(FAILURES_KEY, 0, MAX_FAILURES - 1)
            await pipe.execute()
    except Exception as exc:
        log.warning("could not record job stats: %s", exc)


async def try_started(redis: Redis | None, queue: str, job_id: str) -> int:
    """Count this try as unfinished; return how many earlier tries never finished (deaths).

    Each death is added to the queue's `died` counter once, at the first try that sees it.
    """
    if redis is None:
        return 0
    key = UNFINISHED_KEY_PREFIX + job_id
    try:
        async with asyncio.timeout(BOOKKEEPING_TIMEOUT_S):
            async with redis.pipeline() as pipe:
                pipe.hincrby(key, "unfinished", 1)
                pipe.hget(key, "reported")
                pipe.expire(key, UNFINISHED_TTL_S)
                unfinished, reported, _ = await pipe.execute()
            deaths = max(int(unfinished) - 1, 0)
            new_deaths = deaths - int(reported or 0)
            if new_deaths > 0:
                async with redis.pipeline() as pipe:
                    pipe.hset(key, "reported", str(deaths))
                    pipe.hincrby(stats_key(queue), "died", new_deaths)
                    await pipe.execute()
    except Exception as exc:
        log.warning("could not count the try of %s: %s", job_id, exc)
        return 0
    return deaths


async def try_ended(redis: Redis | None, job_id: str, *, final: bool) -> None:
    """This try ended through our code; `final` (no further try) drops the counter."""
    if redis is None:
        return
    key = UNFINISHED_KEY_PREFIX + job_id
    try:
        async with asyncio.timeout(BOOKKEEPING_TIMEOUT_S):
            if final:
                await redis.delete(key)
            else:
                # redis-py types hash commands for sync and async clients at once.
                await cast(Awaitable[int], redis.hincrby(key, "unfinished", -1))
    except Exception as exc:
        log.warning("could not close the try of %s: %s", job_id, exc)


def summary(raw: dict[Any, Any]) -> dict[str, int]:
    """A stats hash as `{completed, failed, retried, died}` with zeros filled in."""
    decoded = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
    return {name: decoded.get(name, 0) for name in ("completed", "failed", "retried", "died")}

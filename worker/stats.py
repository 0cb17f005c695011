"""Counters and recent failures our job wrapper keeps in Redis, for `python -m worker status`
and the console's `/metrics` (worker/metrics.py): kept in Redis, so every worker process adds
into the same numbers and one scrape covers the cluster.

- `c360:stats:<queue>`: hash of `completed`, `failed`, `retried` (Retry or requeued after a
  shutdown cancel) and `died` (tries whose worker died, seen at the next try);
- `c360:metrics:<queue>`: the same outcomes per job function, and per function two histograms
  of the tries that ended through our code: how long the try ran, and how long the job waited
  from its due time (arq's score: the enqueue time, or the deferred/retry time) to the try's
  start. A histogram is one counter per bucket (`BUCKET_BOUNDS_S`) plus a sum; the field
  layout is private to this module (`record` writes it, `job_metrics` reads it);
- `c360:minute:<minute>` (Unix time // 60): tries ended in that minute, per `<queue>|<outcome>`,
  kept `MINUTE_TTL_S` (a bit over the hour the console's chart shows; `per_minute` reads it);
- `c360:failures`: the last `MAX_FAILURES` failures, newest first, as JSON;
- `c360:unfinished:<job id>`: tries of one job that started and did not end through our code,
  i.e. whose worker died. It tells a poison pill ("the worker died N times") from a job that
  merely used its retries.

Bookkeeping never fails a job: every call here swallows and logs its own errors, within a short
time bound so that a stalled Redis does not hold the job either.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from redis.asyncio import Redis

log = logging.getLogger(__name__)

STATS_KEY_PREFIX = "c360:stats:"
FAILURES_KEY = "c360:failures"
UNFINISHED_KEY_PREFIX = "c360:unfinished:"
MAX_FAILURES = 100
# Same lifetime as arq's own retry counter (arq.worker: `expire(retry_key, 88400)`).
UNFINISHED_TTL_S = 88_400
METRICS_KEY_PREFIX = "c360:metrics:"
MINUTE_KEY_PREFIX = "c360:minute:"
CHART_MINUTES = 60
# Long enough that the oldest minute of the chart is still there, short enough to stay small.
MINUTE_TTL_S = (CHART_MINUTES + 5) * 60
BOOKKEEPING_TIMEOUT_S = 2.0

Outcome = Literal["completed", "failed", "retried"]
OUTCOMES = ("completed", "failed", "retried", "died")
# Upper bounds (seconds) of every duration and queue-wait bucket, +Inf implied: an email send
# takes milliseconds, an import up to JOB_TIMEOUT_S (30 min), a backlog may wait an hour.
# Safe to change: `job_metrics` folds buckets stored under other bounds into these.
BUCKET_BOUNDS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip
Histogram = Literal["duration", "wait"]
# Field separator in the metrics hash: job names are Python identifiers, so never contain it.
_SEP = "|"


def stats_key(queue: str) -> str:
    return STATS_KEY_PREFIX + queue


def metrics_key(queue: str) -> str:
    return METRICS_KEY_PREFIX + queue


def minute_key(minute: int) -> str:
    return f"{MINUTE_KEY_PREFIX}{minute}"


def _count_minute(pipe: Any, queue: str, outcome: str, n: int = 1) -> None:
    key = minute_key(int(time.time() // 60))
    pipe.hincrby(key, _SEP.join((queue, outcome)), n)
    pipe.expire(key, MINUTE_TTL_S)


def _bucket_label(seconds: float) -> str:
    """The `le` of the smallest bucket holding `seconds`, as stored (`repr` of the bound)."""
    index = bisect.bisect_left(BUCKET_BOUNDS_S, seconds)
    return repr(BUCKET_BOUNDS_S[index]) if index < len(BUCKET_BOUNDS_S) else "+Inf"


def _observe(pipe: Any, key: str, job: str, histogram: Histogram, seconds: float) -> None:
    seconds = max(seconds, 0.0)
    pipe.hincrby(key, _SEP.join((job, histogram, _bucket_label(seconds))), 1)
    pipe.hincrbyfloat(key, _SEP.join((job, histogram + "_sum")), seconds)


def queue_wait_s(due_ms: int | None, started_s: float) -> float | None:
    """Seconds from a job's due time (arq's score, in ms) to `started_s` (Unix time)."""
    return None if due_ms is None else max(started_s - due_ms / 1000, 0.0)


async def record(
    redis: Redis | None,
    queue: str,
    outcome: Outcome,
    *,
    job_id: str = "-",
    job: str = "-",
    job_try: int = 1,
    error: str | None = None,
    duration_s: float | None = None,
    queue_wait_s: float | None = None,
) -> None:
    """Count a try's outcome and observe its duration and queue wait: one round trip."""
    if redis is None:
        return
    try:
        async with asyncio.timeout(BOOKKEEPING_TIMEOUT_S), redis.pipeline() as pipe:
            pipe.hincrby(stats_key(queue), outcome, 1)
            pipe.hincrby(metrics_key(queue), _SEP.join((job, outcome)), 1)
            _count_minute(pipe, queue, outcome)
            if duration_s is not None:
                _observe(pipe, metrics_key(queue), job, "duration", duration_s)
            if queue_wait_s is not None:
                _observe(pipe, metrics_key(queue), job, "wait", queue_wait_s)
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


async def try_started(redis: Redis | None, queue: str, job_id: str, job: str = "-") -> int:
    """Count this try as unfinished; return how many earlier tries never finished (deaths).

    Each death is added to the queue's and the job function's `died` counters once, at the
    first try that sees it.
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
                    pipe.hincrby(metrics_key(queue), _SEP.join((job, "died")), new_deaths)
                    _count_minute(pipe, queue, "died", new_deaths)
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
    return {name: decoded.get(name, 0) for name in OUTCOMES}


async def per_minute(redis: Redis, queues: Iterable[str], now_s: float) -> dict[str, Any]:
    """Tries ended in each of the last `CHART_MINUTES` minutes, oldest first, the current last.

    `{"first_minute_at_s": t, "queues": {queue: {outcome: [n, ...]}}}`: one HGETALL a minute,
    in one round trip, whatever the number of jobs.
    """
    last = int(now_s // 60)
    minutes = range(last - CHART_MINUTES + 1, last + 1)
    async with redis.pipeline(transaction=False) as pipe:
        for minute in minutes:
            pipe.hgetall(minute_key(minute))
        replies = await pipe.execute()
    counts = {queue: {o: [0] * CHART_MINUTES for o in OUTCOMES} for queue in queues}
    for index, raw in enumerate(replies):
        for raw_name, raw_value in raw.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            queue, _, outcome = name.partition(_SEP)
            if queue in counts and outcome in OUTCOMES:
                counts[queue][outcome][index] = int(raw_value)
    return {"first_minute_at_s": minutes[0] * 60, "queues": counts}


@dataclass
class HistogramCounts:
    """One histogram as Prometheus wants it: cumulative counts per `le`, +Inf last, and a sum."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKET_BOUNDS_S) + 1))
    sum_s: float = 0.0

    @property
    def count(self) -> int:
        return self.buckets[-1]

    def labelled(self) -> list[tuple[str, int]]:
        bounds = [repr(bound) for bound in BUCKET_BOUNDS_S] + ["+Inf"]
        return list(zip(bounds, self.buckets, strict=True))


@dataclass
class FunctionMetrics:
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    duration: HistogramCounts = field(default_factory=HistogramCounts)
    wait: HistogramCounts = field(default_factory=HistogramCounts)


def job_metrics(raw: Mapping[Any, Any]) -> dict[str, FunctionMetrics]:
    """A queue's metrics hash (HGETALL) as per-function outcomes and cumulative histograms."""
    functions: dict[str, FunctionMetrics] = {}
    per_bucket: dict[tuple[str, str], list[int]] = {}
    for raw_name, raw_value in raw.items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
        job, _, rest = name.partition(_SEP)
        metrics = functions.setdefault(job, FunctionMetrics())
        histogram, _, le = rest.partition(_SEP)
        if rest in OUTCOMES:
            metrics.outcomes[rest] = int(value)
        elif rest in ("duration_sum", "wait_sum"):
            getattr(metrics, rest.removesuffix("_sum")).sum_s = float(value)
        elif histogram in ("duration", "wait") and le:
            counts = per_bucket.setdefault((job, histogram), [0] * (len(BUCKET_BOUNDS_S) + 1))
            # A bound no longer listed goes to the next listed one above it, which still
            # holds every value it held: cumulative counts stay right after a change.
            bound = math.inf if le == "+Inf" else float(le)
            counts[bisect.bisect_left(BUCKET_BOUNDS_S, bound)] += int(value)
    for (job, histogram), counts in per_bucket.items():
        cumulative = getattr(functions[job], histogram).buckets
        running = 0
        for index, count in enumerate(counts):
            running += count
            cumulative[index] = running
    return functions

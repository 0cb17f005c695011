"""Prometheus metrics for the whole cluster, computed at scrape time (the console's `/metrics`).

Nothing here lives in a worker's memory: counters and histograms are the ones the job wrapper
keeps in Redis (worker/stats.py), queue and worker counts are `python -m worker status`'s own
computation, and import and email figures are sums over their PostgreSQL rows. So one scrape of
any console covers every worker process, and a restarted worker or console loses nothing.

    body = await render_metrics(redis, sessions)   # bytes, served with CONTENT_TYPE

Families (CONTRACT §12, base units):
- `c360_jobs_total{queue,function,outcome}`: tries that ended `completed`, `failed`, `retried`,
  and `died` (the worker died mid-try: the lease lapsed and another worker ran it again);
- `c360_job_duration_seconds{queue,function}`, `c360_job_queue_wait_seconds{queue,function}`:
  histograms over the tries that ended through our code (not the `died` ones);
- `c360_queue_jobs{queue,state}` (queued, deferred, running), `c360_workers{queue}`;
- `c360_import_rows_total{outcome}` (created, updated, error), `c360_import_jobs{status}`,
  `c360_export_jobs{status}`;
- `c360_emails_total{provider,status}`: a counter of the emails that reached a final status
  (sent, failed, suppressed), i.e. the outbox rows in it; `c360_email_outbox{provider,status}`:
  a gauge of every outbox row by its status now (pending and review too, which rows leave);
  `provider="none"` for rows no provider has claimed yet;
- `c360_rate_limit_paused_seconds{limiter}` and `c360_rate_limit_halted{limiter}`: what is left
  of a provider's 429 pause, and 1 while a provider refuses the account (worker/ratelimit.py);
- `c360_rate_limit_pauses_total{limiter,reason}`: pauses started (reason: rate_limited, halted);
- `c360_worker_recycles_total{queue}`: worker processes that recycled (worker/recycle.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob, EmailMessage, Export
from jobs.email.outbox import FINAL_STATUSES as FINAL_EMAIL_STATUSES
from jobs.marketing.sync import RATE_LIMIT_KEY_PREFIX as MARKETING_RATE_LIMIT_KEY_PREFIX
from worker.observe import redis_status
from worker.ratelimit import DEFAULT_KEY_PREFIX as EMAIL_RATE_LIMIT_KEY_PREFIX
from worker.ratelimit import RateLimiter
from worker.recycle import RECYCLES_KEY
from worker.routes import QUEUES
from worker.stats import FunctionMetrics, HistogramCounts, job_metrics, metrics_key

# The text format `generate_latest` writes (Prometheus 3 refuses a scrape without it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUEUE_STATES = ("queued", "deferred", "running")
IMPORT_ROW_OUTCOMES = ("created", "updated", "error")
LIMITERS = {"email": EMAIL_RATE_LIMIT_KEY_PREFIX, "marketing": MARKETING_RATE_LIMIT_KEY_PREFIX}
NO_PROVIDER = "none"


@dataclass(frozen=True)
class Limiter:
    """A rate limiter's state now, and how many pauses it ever started."""

    paused_s: float
    halted: bool
    pauses: dict[str, int]


@dataclass(frozen=True)
class Snapshot:
    """Everything one scrape exposes, read before any family is built."""

    queues: dict[str, dict[str, Any]]
    functions: dict[str, dict[str, FunctionMetrics]]
    limiters: dict[str, Limiter]
    recycles: dict[str, int]
    import_rows: dict[str, int]
    import_jobs: dict[str, int]
    export_jobs: dict[str, int]
    emails: dict[tuple[str, str], int]


RedisFigures = tuple[
    dict[str, dict[str, Any]],
    dict[str, dict[str, FunctionMetrics]],
    dict[str, Limiter],
    dict[str, int],
]
DatabaseFigures = tuple[dict[str, int], dict[str, int], dict[str, int], dict[tuple[str, str], int]]


async def _read_redis(redis: Redis) -> RedisFigures:
    status = await redis_status(redis, int(time.time() * 1000))
    async with redis.pipeline(transaction=False) as pipe:
        for queue in QUEUES:
            pipe.hgetall(metrics_key(queue))
        pipe.hgetall(RECYCLES_KEY)
        *raw, recycles_raw = await pipe.execute()
    functions: dict[str, dict[str, FunctionMetrics]] = {
        queue: job_metrics(hash_) for queue, hash_ in zip(QUEUES, raw, strict=True)
    }
    recycled = {key.decode(): int(n) for key, n in recycles_raw.items()}
    limiters: dict[str, Limiter] = {}
    for name, prefix in LIMITERS.items():
        # The rate is not read: these calls only look at the pause, halt and counter keys.
        limiter = RateLimiter(redis, rate_per_s=1.0, key_prefix=prefix)
        limiters[name] = Limiter(
            await limiter.paused_for_s(), await limiter.halted() is not None, await limiter.pauses()
        )
    recycles: dict[str, int] = {queue: recycled.get(queue, 0) for queue in QUEUES}
    return status["queues"], functions, limiters, recycles


async def _read_database(sessions: async_sessionmaker[AsyncSession]) -> DatabaseFigures:
    imports = ContactImportJob
    async with sessions() as session:
        import_rows = (
            await session.execute(
                select(
                    func.coalesce(func.sum(imports.created_count), 0),
                    func.coalesce(func.sum(imports.updated_count), 0),
                    func.coalesce(func.sum(imports.error_count), 0),
                )
            )
        ).one()
        import_jobs = await session.execute(
            select(imports.status, func.count()).group_by(imports.status)
        )
        export_jobs = await session.execute(
            select(Export.status, func.count()).group_by(Export.status)
        )
        emails = await session.execute(
            select(EmailMessage.provider, EmailMessage.status, func.count()).group_by(
                EmailMessage.provider, EmailMessage.status
            )
        )
        return (
            dict(zip(IMPORT_ROW_OUTCOMES, (int(n) for n in import_rows), strict=True)),
            {status: int(n) for status, n in import_jobs},
            {status: int(n) for status, n in export_jobs},
            {(provider or NO_PROVIDER, status): int(n) for provider, status, n in emails},
        )


async def snapshot(redis: Redis, sessions: async_sessionmaker[AsyncSession]) -> Snapshot:
    """Read Redis and PostgreSQL at once. `redis` must answer bytes (no decode_responses)."""
    (queues, functions, limiters, recycles), database = await asyncio.gather(
        _read_redis(redis), _read_database(sessions)
    )
    return Snapshot(queues, functions, limiters, recycles, *database)


def _histogram(name: str, documentation: str, snap: Snapshot, which: str) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=["queue", "function"])
    for queue, functions in snap.functions.items():
        for function, metrics in sorted(functions.items()):
            histogram: HistogramCounts = getattr(metrics, which)
            if histogram.count:
                family.add_metric(
                    [queue, function], histogram.labelled(), sum_value=histogram.sum_s
                )
    return family


class SnapshotCollector(Collector):
    """Serves one `Snapshot` (a registry of its own per scrape, so nothing is kept in memory)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        jobs = CounterMetricFamily(
            "c360_jobs",
            "Job tries by how they ended (died: the worker died during the try).",
            labels=["queue", "function", "outcome"],
        )
        for queue, functions in snap.functions.items():
            for function, metrics in sorted(functions.items()):
                for outcome, count in metrics.outcomes.items():
                    jobs.add_metric([queue, function, outcome], count)
        yield jobs
        yield _histogram("c360_job_duration_seconds", "How long a job try ran.", snap, "duration")
        yield _histogram(
            "c360_job_queue_wait_seconds",
            "From a job's due time (enqueue, deferred or retry time) to its try's start.",
            snap,
            "wait",
        )
        queue_jobs = GaugeMetricFamily(
            "c360_queue_jobs", "Jobs in each queue by state.", labels=["queue", "state"]
        )
        workers = GaugeMetricFamily(
            "c360_workers", "Live worker processes (fresh heartbeat).", labels=["queue"]
        )
        for queue, status in snap.queues.items():
            for state in QUEUE_STATES:
                queue_jobs.add_metric([queue, state], status[state])
            workers.add_metric([queue], len(status["workers"]))
        yield queue_jobs
        yield workers
        rows = CounterMetricFamily(
            "c360_import_rows", "Import rows by outcome, over every import.", labels=["outcome"]
        )
        for outcome, count in snap.import_rows.items():
            rows.add_metric([outcome], count)
        yield rows
        for name, what, counts in (
            ("c360_import_jobs", "Contact imports by status.", snap.import_jobs),
            ("c360_export_jobs", "Exports by status.", snap.export_jobs),
        ):
            family = GaugeMetricFamily(name, what, labels=["status"])
            for status_name, count in sorted(counts.items()):
                family.add_metric([status_name], count)
            yield family
        # A counter may only grow: only final statuses, which a row never leaves, count in it.
        emails = CounterMetricFamily(
            "c360_emails",
            "Emails that reached a final status (sent, failed, suppressed), by provider.",
            labels=["provider", "status"],
        )
        outbox = GaugeMetricFamily(
            "c360_email_outbox",
            "Outbox rows by provider and status, now.",
            labels=["provider", "status"],
        )
        for (provider, status_name), count in sorted(snap.emails.items()):
            if status_name in FINAL_EMAIL_STATUSES:
                emails.add_metric([provider, status_name], count)
            outbox.add_metric([provider, status_name], count)
        yield emails
        yield outbox
        paused = GaugeMetricFamily(
            "c360_rate_limit_paused_seconds",
            "Seconds left of a provider's rate-limit (429) pause.",
            labels=["limiter"],
        )
        halted = GaugeMetricFamily(
            "c360_rate_limit_halted",
            "1 while a provider refuses the account (401/403) and sending is halted.",
            labels=["limiter"],
        )
        pauses = CounterMetricFamily(
            "c360_rate_limit_pauses",
            "Pauses a rate limiter started: a provider's 429 (rate_limited) or a halt.",
            labels=["limiter", "reason"],
        )
        for name, limiter in snap.limiters.items():
            paused.add_metric([name], limiter.paused_s)
            halted.add_metric([name], 1.0 if limiter.halted else 0.0)
            for reason, count in limiter.pauses.items():
                pauses.add_metric([name, reason], count)
        yield paused
        yield halted
        yield pauses
        recycles = CounterMetricFamily(
            "c360_worker_recycles",
            "Worker processes that drained and exited at their job or memory limit.",
            labels=["queue"],
        )
        for queue, count in snap.recycles.items():
            recycles.add_metric([queue], count)
        yield recycles


async def render_metrics(redis: Redis, sessions: async_sessionmaker[AsyncSession]) -> bytes:
    """The Prometheus text exposition of the cluster now (serve it with `CONTENT_TYPE`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(await snapshot(redis, sessions)))
    return generate_latest(registry)

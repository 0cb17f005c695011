"""`status [--json]`: what Flower showed, from Redis and PostgreSQL, in well under a second.

Every Redis figure is O(log n) or O(workers), never O(queued jobs): queued and deferred are
ZCOUNTs on the queue's sorted set (score <= now: due; score > now: deferred or retrying),
running jobs come from the lease mirror `c360:running:<queue>` (worker/lease.py), counters and
recent failures from worker/stats.py, and live workers from arq's per-process health-check
keys (`QUEUE:health-check:HOST:PID`, found by SCAN, which costs one round trip per 10,000 keys).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from db.models import ContactImportJob, Export
from db.session import create_engine, make_sessionmaker
from worker.lease import running_key
from worker.main import HEALTH_CHECK_INTERVAL_S
from worker.routes import QUEUES
from worker.settings import Settings
from worker.stats import FAILURES_KEY, stats_key, summary

RECENT_FAILURES = 10
MAX_PROGRESS_ROWS = 20
REDIS_TIMEOUT_S = 3.0


def register(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status", help="queues, workers, job counts, recent failures, running imports/exports"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_status)


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


async def redis_status(client: aioredis.Redis, now_ms: int) -> dict[str, Any]:
    queues = list(QUEUES)
    async with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zcount(queue, "-inf", now_ms)
            pipe.zcount(queue, f"({now_ms}", "+inf")
            pipe.hgetall(running_key(queue))
            pipe.hgetall(stats_key(queue))
        pipe.lrange(FAILURES_KEY, 0, RECENT_FAILURES - 1)
        replies = await pipe.execute()
    health_keys = [
        key.decode() async for key in client.scan_iter(match="*:health-check:*", count=10_000)
    ]
    async with client.pipeline(transaction=False) as pipe:
        for key in health_keys:
            pipe.get(key)
            pipe.pttl(key)
        health = await pipe.execute()

    result: dict[str, Any] = {}
    for index, queue in enumerate(queues):
        queued, deferred, running_raw, stats_raw = replies[4 * index : 4 * index + 4]
        running = []
        for job_id, raw in running_raw.items():
            entry = json.loads(raw)
            if entry.get("lease_until_ms", 0) < now_ms:
                continue  # its worker died; the reconciler prunes the entry
            running.append(
                {
                    "job_id": job_id.decode(),
                    "worker": entry.get("worker"),
                    "started_at": _iso(entry.get("started_ms", now_ms)),
                }
            )
        running.sort(key=lambda job: (job["started_at"], job["job_id"]))
        result[queue] = {
            "queued": queued,
            "deferred": deferred,
            "running": len(running),
            "running_jobs": running,
            "workers": [],
            "counts": summary(stats_raw),
        }
    for position, key in enumerate(health_keys):
        queue, _, worker = key.partition(":health-check:")
        info, ttl_ms = health[2 * position], health[2 * position + 1]
        if queue not in result or info is None:
            continue
        # arq writes the key with a TTL of (interval + 1) s at each heartbeat.
        age_s = max(0.0, HEALTH_CHECK_INTERVAL_S + 1 - ttl_ms / 1000) if ttl_ms > 0 else None
        result[queue]["workers"].append(
            {
                "worker": worker,
                "last_heartbeat_s_ago": None if age_s is None else round(age_s, 1),
                "info": info.decode(errors="replace"),
            }
        )
    for queue_status in result.values():
        queue_status["workers"].sort(key=lambda w: w["worker"])
    failures = [json.loads(raw) for raw in replies[-1]]
    return {"queues": result, "recent_failures": failures}


async def database_status(settings: Settings) -> dict[str, Any]:
    engine = create_engine(settings.database, pool_size=1)
    try:
        async with make_sessionmaker(engine)() as session:
            imports = await session.scalars(
                select(ContactImportJob)
                .where(ContactImportJob.status == "processing")
                .order_by(ContactImportJob.started_at)
                .limit(MAX_PROGRESS_ROWS)
            )
            exports = await session.scalars(
                select(Export)
                .where(Export.status == "processing")
                .order_by(Export.started_at)
                .limit(MAX_PROGRESS_ROWS)
            )
            return {
                "imports": [
                    {
                        "id": str(row.id),
                        "processed_rows": row.processed_rows,
                        "total_rows": row.total_rows,
                        "percent": round(100.0 * row.processed_rows / row.total_rows, 1)
                        if row.total_rows
                        else 0.0,
                        "started_at": row.started_at.isoformat() if row.started_at else None,
                    }
                    for row in imports
                ],
                "exports": [
                    {
                        "id": str(row.id),
                        "kind": row.kind,
                        "row_count": row.row_count,
                        "started_at": row.started_at.isoformat() if row.started_at else None,
                    }
                    for row in exports
                ],
            }
    finally:
        await engine.dispose()


async def collect(settings: Settings) -> dict[str, Any]:
    """The whole status as a JSON-able dict (the `--json` output)."""
    now_ms = int(time.time() * 1000)
    client = aioredis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )
    try:
        from_redis = await redis_status(client, now_ms)
    except redis.exceptions.RedisError as exc:
        where = client.connection_pool.connection_kwargs
        raise ConnectionError(
            f"cannot read Redis at {where.get('host')}:{where.get('port')}: {exc}"
        ) from None
    finally:
        await client.aclose()
    try:
        from_database = await database_status(settings)
    except (OSError, SQLAlchemyError) as exc:
        where = settings.database
        # The first line only: SQLAlchemy appends the SQL and a link; no secrets in either.
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConnectionError(
            f"cannot read PostgreSQL at {where.host}:{where.port}/{where.database} "
            f"({type(exc).__name__}: {reason})"
        ) from None
    return {"generated_at": _iso(now_ms), **from_redis, **from_database}


def render(status: dict[str, Any], console: Console) -> None:
    queues = Table(title=f"Queues at {status['generated_at']}")
    # no_wrap: counts and queue names must never be cut to "impor…" in a narrow terminal.
    queues.add_column("queue", no_wrap=True)
    for column in ("queued", "deferred", "running", "workers"):
        queues.add_column(column, justify="right", no_wrap=True)
    for column in ("completed", "failed", "retried", "died"):
        queues.add_column(column, justify="right", no_wrap=True)
    for name, queue in status["queues"].items():
        counts = queue["counts"]
        queues.add_row(
            name,
            *(str(queue[k]) for k in ("queued", "deferred", "running")),
            str(len(queue["workers"])),
            *(str(counts[k]) for k in ("completed", "failed", "retried", "died")),
        )
    console.print(queues)
    workers = Table(title="Workers")
    for column in ("queue", "worker", "last heartbeat", "arq's report"):
        workers.add_column(column)
    for name, queue in status["queues"].items():
        for worker in queue["workers"]:
            age = worker["last_heartbeat_s_ago"]
            seen = "-" if age is None else f"{age:.0f} s ago"
            workers.add_row(name, worker["worker"], seen, worker["info"])
    console.print(workers)
    if status["imports"] or status["exports"]:
        progress = Table(title="Running imports and exports")
        for column in ("kind", "id", "progress", "started"):
            progress.add_column(column)
        for row in status["imports"]:
            done = f"{row['processed_rows']}/{row['total_rows'] or '?'} rows ({row['percent']}%)"
            progress.add_row("import", row["id"], done, row["started_at"] or "-")
        for row in status["exports"]:
            done = f"{row['row_count']} rows"
            progress.add_row(f"export {row['kind']}", row["id"], done, row["started_at"] or "-")
        console.print(progress)
    failures = Table(title="Recent failures")
    for column in ("when", "queue", "job", "error"):
        failures.add_column(column)
    for failure in status["recent_failures"]:
        failures.add_row(
            _iso(failure["at_s"] * 1000),
            failure["queue"],
            f"{failure['job']} ({failure['job_id']}, try {failure['try']})",
            failure["error"],
        )
    console.print(failures)


async def run_status(args: argparse.Namespace, settings: Settings) -> int:
    status = await collect(settings)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        # Piped or over `kubectl exec` there is no terminal width: rich would assume 80 columns.
        render(status, Console(width=None if sys.stdout.isatty() else 160))
    return 0

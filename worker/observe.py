"""What the cluster is doing, from Redis and PostgreSQL: `status --json` and the console's overview.

`python -m worker status` and the web console (worker/web) both read through `snapshot`, so
the two always show the same numbers.

Every Redis figure is O(log n) or O(workers), never O(queued jobs): queued and deferred are
ZCOUNTs on the queue's sorted set (score <= now: due; score > now: deferred or retrying),
running jobs come from the lease mirror `c360:running:<queue>` (worker/lease.py), counters and
recent failures from worker/stats.py, and live workers from arq's per-process health-check
keys (`QUEUE:health-check:HOST:PID`), listed by the workers themselves in `c360:workers`
(worker/lease.py): a SCAN for them would cost O(every key), queued jobs' payloads included.
Each worker has its own hash (start time, RSS: worker/process_info.py), read in the same round
trip as the heartbeats. The jobs-per-minute chart is 60 per-minute hashes (worker/stats.py), one
round trip whatever the number of jobs.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob, Export
from db.session import create_engine, make_sessionmaker
from worker import process_info
from worker.lease import WORKER_SEEN_WINDOW_MS, WORKERS_KEY, running_key
from worker.main import HEALTH_CHECK_INTERVAL_S
from worker.redis_connect import describe, redis_client
from worker.routes import QUEUES
from worker.settings import Settings
from worker.stats import FAILURES_KEY, per_minute, stats_key, summary

RECENT_FAILURES = 10
MAX_PROGRESS_ROWS = 20
REDIS_TIMEOUT_S = 3.0


# arq's heartbeat: "<time> j_complete=N j_failed=N j_retried=N j_ongoing=N queued=N".
_ARQ_TRIES_ENDED = re.compile(r"\bj_(?:complete|failed|retried)=(\d+)")


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def jobs_done(heartbeat: str) -> int | None:
    """Tries this process has ended (completed, failed or retried), from arq's heartbeat."""
    counts = _ARQ_TRIES_ENDED.findall(heartbeat)
    return sum(int(n) for n in counts) if counts else None


async def redis_status(client: aioredis.Redis, now_ms: int) -> dict[str, Any]:
    queues = list(QUEUES)
    async with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zcount(queue, "-inf", now_ms)
            pipe.zcount(queue, f"({now_ms}", "+inf")
            pipe.hgetall(running_key(queue))
            pipe.hgetall(stats_key(queue))
            # The lowest score is the job due longest ago (arq scores by due time, in ms).
            pipe.zrange(queue, 0, 0, withscores=True)
        pipe.lrange(FAILURES_KEY, 0, RECENT_FAILURES - 1)
        pipe.zrangebyscore(WORKERS_KEY, now_ms - WORKER_SEEN_WINDOW_MS, "+inf")
        *replies, registered = await pipe.execute()
    health_keys = sorted(key.decode() for key in registered)
    async with client.pipeline(transaction=False) as pipe:
        for key in health_keys:
            pipe.get(key)
            pipe.pttl(key)
            pipe.hgetall(process_info.process_key(key.partition(":health-check:")[2]))
        health = await pipe.execute()

    result: dict[str, Any] = {}
    for index, queue in enumerate(queues):
        queued, deferred, running_raw, stats_raw, first = replies[5 * index : 5 * index + 5]
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
        due_ms = first[0][1] if first else None
        result[queue] = {
            "queued": queued,
            "deferred": deferred,
            "oldest_queued_age_s": round((now_ms - due_ms) / 1000, 3)
            if due_ms is not None and due_ms <= now_ms
            else None,
            "running": len(running),
            "running_jobs": running,
            "workers": [],
            "counts": summary(stats_raw),
        }
    for position, key in enumerate(health_keys):
        queue, _, worker = key.partition(":health-check:")
        info, ttl_ms, own = health[3 * position : 3 * position + 3]
        if queue not in result or info is None:
            continue
        # arq writes the key with a TTL of (interval + 1) s at each heartbeat.
        age_s = max(0.0, HEALTH_CHECK_INTERVAL_S + 1 - ttl_ms / 1000) if ttl_ms > 0 else None
        described = process_info.parse(own)
        heartbeat = info.decode(errors="replace")
        host, _, pid = worker.rpartition(":")
        result[queue]["workers"].append(
            {
                "worker": worker,
                "host": host,
                "pid": int(pid) if pid.isdigit() else None,
                "last_heartbeat_s_ago": None if age_s is None else round(age_s, 1),
                "started_at": _iso(described["started_ms"]) if "started_ms" in described else None,
                "rss_bytes": described.get("rss_bytes"),
                "jobs_done": jobs_done(heartbeat),
                "info": heartbeat,
            }
        )
    for queue_status in result.values():
        queue_status["workers"].sort(key=lambda w: w["worker"])
    failures = [json.loads(raw) for raw in replies[-1]]
    return {
        "queues": result,
        "recent_failures": failures,
        "jobs_per_minute": await per_minute(client, queues, now_ms / 1000),
    }


async def database_status(sessions: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    async with sessions() as session:
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


async def snapshot(
    client: aioredis.Redis, sessions: async_sessionmaker[AsyncSession]
) -> dict[str, Any]:
    """The whole status as a JSON-able dict (the `--json` output), over open connections."""
    now_ms = int(time.time() * 1000)
    from_redis = await redis_status(client, now_ms)
    return {"generated_at": _iso(now_ms), **from_redis, **await database_status(sessions)}


OVERVIEW_FIELDS = ("queued", "deferred", "running", "oldest_queued_age_s")


def overview(status: dict[str, Any]) -> dict[str, Any]:
    """`GET /api/overview` (CONTRACT §12) from a `snapshot`: per queue, counts only.

    Plus `jobs_per_minute` for the chart: the tries ended in each of the last 60 minutes,
    per queue and outcome (worker/stats.py `per_minute`).
    """
    return {
        "queues": {
            name: {
                **{field: queue[field] for field in OVERVIEW_FIELDS},
                "workers": len(queue["workers"]),
                **queue["counts"],
            }
            for name, queue in status["queues"].items()
        },
        "jobs_per_minute": status["jobs_per_minute"],
    }


async def collect(settings: Settings) -> dict[str, Any]:
    """`snapshot` for a one-off caller (the CLI): opens and closes its own connections.

    A service that cannot be reached raises `ConnectionError` naming it, without secrets.
    """
    client = redis_client(settings, timeout_s=REDIS_TIMEOUT_S)
    engine = create_engine(settings.database, pool_size=1, pooler=settings.database_pooler)
    try:
        return await snapshot(client, make_sessionmaker(engine))
    except redis.exceptions.RedisError as exc:
        raise ConnectionError(f"cannot read Redis at {describe(settings)}: {exc}") from None
    except (OSError, SQLAlchemyError) as exc:
        where = settings.database
        # The first line only: SQLAlchemy appends the SQL and a link; no secrets in either.
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConnectionError(
            f"cannot read PostgreSQL at {where.host}:{where.port}/{where.database} "
            f"({type(exc).__name__}: {reason})"
        ) from None
    finally:
        await client.aclose()
        await engine.dispose()

"""Console latency and CPU with a large backlog: what an operator's dashboards cost.

    make bench-console          # or: .venv/bin/python bench/bench_console.py [--requests 300]

Fills a database of its own (dropped at the end) and Redis db BENCH_REDIS_DB (default 11;
refused unless empty, the test rig's or left by an earlier run of this bench; flushed before
and after) with 100,000 queued `send_email` jobs (arq's payload keys and queue entries, due
over the last hour), 10,000 import rows and 100,000 outbox rows, then serves the console as
production does (`python -m worker console`, uvicorn, its own process, on a loopback port)
and reports:

- p50/p95/max latency of sequential requests with a signed-in session: `/api/overview`, the
  imports list (the page and its JSON API, first and a filtered page), and for scale the email
  page's API (outbox counts over 100,000 rows) and `/metrics`;
- 50 dashboards polling `/api/overview` every 2 s for 30 s (each its own connection, as tabs
  are): the console process's CPU seconds per wall second (psutil) and the latency under load.

Every request is checked for 200; the whole run takes about two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_email import cpu_s, start, stop  # noqa: E402 (this folder: run as a script)

from worker.lease import WORKERS_KEY, running_key  # noqa: E402 (after the path: a script)
from worker.routes import QUEUES, SEND_EMAIL  # noqa: E402
from worker.serialization import serialize  # noqa: E402
from worker.stats import FAILURES_KEY, MAX_FAILURES, stats_key  # noqa: E402

PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "11"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
# Marks a Redis db as this bench's own, so a run that was interrupted may be flushed by the next.
OWNER_KEY = "c360:bench-console-owns-this-db"
RIG_MARKER = "c360:test-rig-owns-this-db"  # tests/conftest.py: the tests flush it anyway
PASSWORD = "bench-console-pw"
QUEUED_JOBS = 100_000
IMPORT_ROWS = 10_000
OUTBOX_ROWS = 100_000
USERS = 1_000
DASHBOARDS = 50
POLL_S = 2.0
GOAL_P95_MS = 50.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- the backlog ------------------------------------------------------------------------------


async def claim_redis(redis: Redis) -> bool:
    """Flush the db if it is empty, ours or the test rig's; True if it was the rig's."""
    rig = bool(await redis.exists(RIG_MARKER))
    if await redis.dbsize() and not (rig or await redis.exists(OWNER_KEY)):
        sys.exit(f"Redis db {REDIS_DB} holds keys of others; set BENCH_REDIS_DB to a free one")
    await redis.flushdb()
    await redis.set(OWNER_KEY, "1")
    return rig


async def fill_redis(redis: Redis) -> None:
    """What a backlog puts in Redis: arq's job keys and queue entries, and our counters."""
    from arq.constants import job_key_prefix
    from arq.jobs import serialize_job

    now_ms = int(time.time() * 1000)
    for first in range(0, QUEUED_JOBS, 5_000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(first, min(first + 5_000, QUEUED_JOBS)):
                job_id = uuid.uuid4().hex
                due_ms = now_ms - 3_600_000 + i * 3_600_000 // QUEUED_JOBS  # over the last hour
                kwargs = {"to": f"r{i}@example.com", "subject": "Backlog", "html": "<p>hi</p>"}
                payload = serialize_job(
                    SEND_EMAIL.name, (), kwargs, None, due_ms, serializer=serialize
                )
                pipe.set(job_key_prefix + job_id, payload, px=86_400_000)
                pipe.zadd(SEND_EMAIL.queue, {job_id: due_ms})
            await pipe.execute()
    async with redis.pipeline(transaction=False) as pipe:
        for queue in QUEUES:
            # Two live workers per queue, each running three jobs (arq's health-check key, the
            # worker registry, our lease mirror); long-lived, since nothing here renews them.
            for pid in (101, 102):
                worker = f"bench-host:{pid}"
                heartbeat = f"{queue}:health-check:{worker}"
                pipe.set(heartbeat, "j_complete=0 j_ongoing=3", px=600_000)
                pipe.zadd(WORKERS_KEY, {heartbeat: now_ms + 600_000})  # as if just announced
                for _ in range(3):
                    entry = f'{{"worker": "{worker}", "started_ms": {now_ms}, '
                    entry += f'"lease_until_ms": {now_ms + 600_000}}}'
                    pipe.hset(running_key(queue), uuid.uuid4().hex, entry)
            counts = {"completed": 250_000, "failed": 120, "retried": 900, "died": 2}
            pipe.hset(stats_key(queue), mapping=counts)
        for i in range(MAX_FAILURES):
            failure = f'{{"at_s": {now_ms / 1000 - i}, "queue": "default", "job_id": "j{i}", '
            failure += f'"job": "send_email", "try": 4, "error": "provider answered 422 ({i})"}}'
            pipe.rpush(FAILURES_KEY, failure)
        await pipe.execute()


async def fill_database(db: asyncpg.Connection) -> None:
    """Users, import rows and outbox rows in the proportions a busy month leaves."""
    await db.execute(
        "INSERT INTO users (id, email) SELECT gen_random_uuid(), 'u' || i || '@example.com' "
        "FROM generate_series(1, $1) i",
        USERS,
    )
    # Mostly finished imports over 30 days, 20 running now, a few pending, failed, cancelled.
    await db.execute(
        """
        INSERT INTO contact_import_jobs (user_id, file_path, status, total_rows, processed_rows,
            created_count, updated_count, error_count, message, created_at, started_at,
            finished_at)
        SELECT u.ids[1 + i % $2], 'bench/' || i || '.csv', s.status, 50000,
            CASE WHEN s.status = 'pending' THEN 0 WHEN s.status = 'processing' THEN 20000
                 ELSE 50000 END,
            40000, 9000, 1000,
            CASE WHEN s.status = 'failed' THEN 'could not read the file' END,
            now() - i * interval '4 minutes',
            CASE WHEN s.status <> 'pending' THEN now() - i * interval '4 minutes' END,
            CASE WHEN s.status IN ('completed', 'failed', 'cancelled')
                 THEN now() - i * interval '4 minutes' + interval '1 minute' END
        FROM generate_series(1, $1) i
        CROSS JOIN LATERAL (SELECT CASE WHEN i <= 20 THEN 'processing'
                                        WHEN i <= 120 THEN 'pending'
                                        WHEN i % 40 = 0 THEN 'failed'
                                        WHEN i % 97 = 0 THEN 'cancelled'
                                        ELSE 'completed' END AS status) s
        CROSS JOIN (SELECT array_agg(id) AS ids FROM users) u
        """,
        IMPORT_ROWS,
        USERS,
    )
    await db.execute(
        """
        INSERT INTO email_messages (idempotency_key, to_email, subject, html, status, provider,
            attempts, last_error, created_at, updated_at, sent_at)
        SELECT 'bench/' || i, 'r' || i || '@example.com', 'Benchmark', '<p>hi</p>', s.status,
            'resend', 1, CASE WHEN s.status IN ('failed', 'review') THEN 'provider said no' END,
            now() - i * interval '20 seconds', now() - i * interval '20 seconds',
            CASE WHEN s.status = 'sent' THEN now() - i * interval '20 seconds' END
        FROM generate_series(1, $1) i
        CROSS JOIN LATERAL (SELECT CASE WHEN i % 100 = 0 THEN 'review'
                                        WHEN i % 50 = 0 THEN 'failed'
                                        WHEN i <= 500 THEN 'pending'
                                        ELSE 'sent' END AS status) s
        """,
        OUTBOX_ROWS,
    )
    await db.execute("ANALYZE")  # what autovacuum would have done on a table this old


# ---- measuring --------------------------------------------------------------------------------


def percentile_ms(samples_s: list[float], percent: int) -> float:
    return 1000 * statistics.quantiles(samples_s, n=100, method="inclusive")[percent - 1]


async def timed_get(client: httpx.AsyncClient, path: str) -> float:
    started = time.perf_counter()
    response = await client.get(path)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} answered {response.status_code}: {response.text[:200]}")
    return elapsed


async def sequential(client: httpx.AsyncClient, path: str, requests: int) -> str:
    for _ in range(20):  # warm-up: connections, statement caches, templates
        await timed_get(client, path)
    samples = [await timed_get(client, path) for _ in range(requests)]
    p95 = percentile_ms(samples, 95)
    verdict = (
        ""
        if not path.startswith(("/api/overview", "/imports", "/api/imports"))
        else (" (goal met)" if p95 < GOAL_P95_MS else " (goal missed)")
    )
    return (
        f"| `{path}` | {requests} | {percentile_ms(samples, 50):.1f} | {p95:.1f}{verdict} "
        f"| {1000 * max(samples):.1f} |"
    )


async def dashboards(base_url: str, cookies: httpx.Cookies, pid: int, duration_s: float) -> str:
    """DASHBOARDS clients polling /api/overview every POLL_S, started at random offsets."""
    samples: list[float] = []
    deadline = time.monotonic() + duration_s

    async def tab() -> None:
        async with httpx.AsyncClient(base_url=base_url, cookies=cookies, timeout=30) as client:
            await asyncio.sleep(random.uniform(0, POLL_S))
            next_at = time.monotonic()
            while next_at < deadline:
                samples.append(await timed_get(client, "/api/overview"))
                next_at += POLL_S
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    cpu0, wall0 = cpu_s(pid), time.perf_counter()
    await asyncio.gather(*(tab() for _ in range(DASHBOARDS)))
    cpu, wall = cpu_s(pid) - cpu0, time.perf_counter() - wall0
    return (
        f"| {DASHBOARDS} tabs polling `/api/overview` every {POLL_S:.0f} s | {wall:.0f} s "
        f"| {len(samples)} ({len(samples) / wall:.1f}/s) | {cpu / wall:.2f} "
        f"| {percentile_ms(samples, 50):.1f} | {percentile_ms(samples, 95):.1f} |"
    )


async def sign_in(base_url: str) -> httpx.Cookies:
    async with httpx.AsyncClient(base_url=base_url) as client:
        answer = await client.post("/login", data={"username": "admin", "password": PASSWORD})
        if answer.status_code != 303:
            raise RuntimeError(f"login answered {answer.status_code}")
        return client.cookies


async def wait_healthy(base_url: str, console: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        for _ in range(300):
            if console.poll() is not None:
                sys.exit(f"the console exited: see {log}")
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    sys.exit(f"the console did not start in 30 s: see {log}")


async def main() -> None:
    parser = argparse.ArgumentParser(description="console latency benchmark")
    parser.add_argument("--requests", type=int, default=300, help="per endpoint, sequential")
    parser.add_argument("--poll-s", type=float, default=30.0, help="how long the tabs poll")
    args = parser.parse_args()

    redis = Redis.from_url(REDIS_URL)
    rig = await claim_redis(redis)
    database = f"c360_bench_console_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    log = Path(tempfile.mkdtemp(prefix="bench-console-")) / "console.log"
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "DATABASE_URL": f"{PG_SERVER.replace('postgresql://', 'postgresql+asyncpg://')}/{database}",
        "REDIS_URL": REDIS_URL,
        "CONSOLE_PASSWORD": PASSWORD,
        "PYTHONPATH": str(ROOT),
    }
    console: subprocess.Popen[bytes] | None = None
    try:
        migrate = [sys.executable, "-m", "worker", "migrate"]
        subprocess.run(migrate, env=env, cwd=ROOT, check=True, capture_output=True)  # noqa: ASYNC221 (set-up)
        filled_at = time.perf_counter()
        db = await asyncpg.connect(f"{PG_SERVER}/{database}")
        await fill_database(db)
        await db.close()
        await fill_redis(redis)
        print(
            f"filled in {time.perf_counter() - filled_at:.0f} s: {QUEUED_JOBS:,} queued jobs, "
            f"{IMPORT_ROWS:,} import rows, {OUTBOX_ROWS:,} outbox rows, "
            f"{await redis.dbsize():,} Redis keys; console log in {log}\n",
            flush=True,
        )
        # Set-up before any timing: blocking here costs the measurements nothing.
        command = [sys.executable, "-m", "worker", "console", "--host", "127.0.0.1"]
        console = start([*command, "--port", str(port)], env, log)
        await wait_healthy(base_url, console, log)
        cookies = await sign_in(base_url)
        print("| request (signed in, one at a time) | requests | p50 ms | p95 ms | max ms |")
        print("|---|---|---|---|---|", flush=True)
        paths = [
            "/api/overview",
            "/imports",
            "/api/imports",
            "/api/imports?status=failed&page=2",
            "/api/email",
            "/metrics",
        ]
        async with httpx.AsyncClient(base_url=base_url, cookies=cookies, timeout=30) as client:
            for path in paths:
                print(await sequential(client, path, args.requests), flush=True)
        print("\n| load | wall | requests | console CPU s per s | p50 ms | p95 ms |")
        print("|---|---|---|---|---|---|", flush=True)
        print(await dashboards(base_url, cookies, console.pid, args.poll_s), flush=True)
    finally:
        if console is not None:
            stop(console)
        await redis.flushdb()
        if rig:
            await redis.set(RIG_MARKER, "1")
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())

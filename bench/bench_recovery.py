"""Seconds from SIGKILL of a worker running a job to that job running again on another worker.

Stock arq (a plain `arq.Worker`) against ours (`python -m worker work default`: short renewed
leases), median of `TRIALS` each, both flavours side by side on loopback: a private
`redis-server` on a free port and a throw-away PostgreSQL database, both removed at the end.

Stock arq marks a running job `in-progress` for its longest job timeout + 10 s, so its recovery
is about `job_timeout + 10 s - (time the job ran before the kill)`. To keep this run short the
stock worker uses a 10 s job timeout (~20 s); at arq's default 300 s that is ~310 s, and with
this project's JOB_TIMEOUT_S=1800 (+30 s grace) ~1840 s. Ours is bounded by the 15 s lease.

The job is idempotent (one `bench_done` row per key); every completed run is counted, so a job
run to completion twice shows as doubled, a job never completed as lost. Both must be 0.

    make bench-recovery        # or: .venv/bin/python bench/bench_recovery.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from worker.context import Ctx
from worker.job import job

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 5
STOCK_JOB_TIMEOUT_S = 10
STOCK_QUEUE = "stock"
PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
DDL = (
    "CREATE TABLE bench_runs (key text NOT NULL, pid int NOT NULL,"
    " started_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE bench_done (key text PRIMARY KEY, completions int NOT NULL DEFAULT 1)",
)


async def bench_step(dsn: str, key: str, first_run_sleep_s: float) -> None:
    """Record the run; sleep on the first run only (the one the bench kills); count completion."""
    connection = await asyncpg.connect(dsn)
    try:
        earlier = await connection.fetchval("SELECT count(*) FROM bench_runs WHERE key=$1", key)
        await connection.execute(
            "INSERT INTO bench_runs (key, pid) VALUES ($1, $2)", key, os.getpid()
        )
    finally:
        await connection.close()
    await asyncio.sleep(first_run_sleep_s if earlier == 0 else 0)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "INSERT INTO bench_done (key) VALUES ($1)"
            " ON CONFLICT (key) DO UPDATE SET completions = bench_done.completions + 1",
            key,
        )
    finally:
        await connection.close()


@job()
async def bench_job(ctx: Ctx, key: str, first_run_sleep_s: float) -> None:
    """Ours: loaded by `python -m worker work default` through C360_JOB_MODULES."""
    await bench_step(ctx["settings"].database_url.replace("+asyncpg", ""), key, first_run_sleep_s)


JOBS = [bench_job]


async def stock_job(ctx: dict[str, Any], key: str, first_run_sleep_s: float) -> None:
    await bench_step(os.environ["BENCH_DSN"], key, first_run_sleep_s)


async def run_stock_worker() -> None:
    """Stock arq: default settings except the job timeout and a per-process health key."""
    from arq.connections import RedisSettings
    from arq.worker import Worker

    worker = Worker(
        functions=[stock_job],
        queue_name=STOCK_QUEUE,
        redis_settings=RedisSettings.from_dsn(os.environ["REDIS_URL"]),
        job_timeout=STOCK_JOB_TIMEOUT_S,
        health_check_key=f"{STOCK_QUEUE}:health-check:{os.getpid()}",
        health_check_interval=1,
    )
    try:
        await worker.async_run()
    finally:
        await worker.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_redis(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL,
    )  # fmt: skip


class Bench:
    def __init__(self, redis_url: str, dsn: str) -> None:
        self.redis_url, self.dsn = redis_url, dsn
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DATABASE_URL": dsn.replace("postgresql://", "postgresql+asyncpg://"),
            "BENCH_DSN": dsn,
            "C360_JOB_MODULES": "bench.bench_recovery",
            "PYTHONPATH": str(ROOT),
            "LOG_LEVEL": "WARNING",
        }

    def start(self, flavour: str) -> subprocess.Popen[bytes]:
        args = ["bench/bench_recovery.py", "--stock-worker"] if flavour == "stock" else [
            "-m", "worker", "work", "default"]  # fmt: skip
        return subprocess.Popen(
            [sys.executable, *args], env=self.env, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def poll(self, sql: str, *args: Any, timeout_s: float = 120) -> Any:
        deadline = time.monotonic() + timeout_s
        connection = await asyncpg.connect(self.dsn)
        try:
            while time.monotonic() < deadline:
                if value := await connection.fetchval(sql, *args):
                    return value
                await asyncio.sleep(0.05)
        finally:
            await connection.close()
        raise TimeoutError(f"no answer to {sql!r} within {timeout_s} s")

    async def ready(self, redis: Any, queue: str, pid: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            async for _ in redis.scan_iter(match=f"{queue}:health-check:*{pid}"):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"worker {pid} never became ready")

    async def trial(self, flavour: str, number: int, pool: Any) -> float:
        key, queue = f"{flavour}-{number}", STOCK_QUEUE if flavour == "stock" else "default"
        first = self.start(flavour)
        await pool.enqueue_job(
            "stock_job" if flavour == "stock" else "bench_job",
            key=key, first_run_sleep_s=600, _job_id=key, _queue_name=queue,
        )  # fmt: skip
        await self.poll("SELECT count(*) FROM bench_runs WHERE key = $1", key)
        second = self.start(flavour)
        await self.ready(pool, queue, second.pid)
        first.send_signal(signal.SIGKILL)
        killed_at_s = time.time()
        first.wait()
        rerun_at = await self.poll(
            "SELECT max(started_at) FROM bench_runs WHERE key = $1 HAVING count(*) > 1", key
        )
        await self.poll("SELECT 1 FROM bench_done WHERE key = $1", key)
        second.send_signal(signal.SIGTERM)
        second.wait(30)
        return float(rerun_at.timestamp() - killed_at_s)


async def time_status(redis_url: str, dsn: str) -> list[float]:
    """Seconds `python -m worker status` needs to collect, with 100,000 jobs queued."""
    from db.migrate import upgrade
    from worker.observe import collect
    from worker.settings import Settings

    settings = Settings(redis_url=redis_url, database_url=dsn)
    await upgrade(settings.database)
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    now_ms = int(time.time() * 1000)
    async with client.pipeline(transaction=False) as pipe:
        for start in range(0, 100_000, 10_000):
            pipe.zadd("default", {f"q{n}": now_ms - n for n in range(start, start + 10_000)})
        await pipe.execute()
    timings = []
    for _ in range(TRIALS):
        started = time.perf_counter()
        await collect(settings)
        timings.append(time.perf_counter() - started)
    await client.delete("default")
    await client.aclose()
    return timings


async def main() -> None:
    from arq.connections import RedisSettings, create_pool

    from worker.serialization import deserialize, serialize

    port = free_port()
    redis_server = start_redis(port)
    database = f"c360_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = f"{PG_SERVER}/{database}"
    try:
        setup = await asyncpg.connect(dsn)
        for statement in DDL:
            await setup.execute(statement)
        await setup.close()
        await asyncio.sleep(0.5)  # redis-server start-up
        bench = Bench(f"redis://127.0.0.1:{port}/0", dsn)
        settings = RedisSettings.from_dsn(bench.redis_url)
        stock_pool = await create_pool(settings)
        our_pool = await create_pool(
            settings, job_serializer=serialize, job_deserializer=deserialize
        )

        async def trials(flavour: str, pool: Any) -> list[float]:
            return [await bench.trial(flavour, n, pool) for n in range(TRIALS)]

        status_s = await time_status(bench.redis_url, dsn)
        started = time.monotonic()
        stock, ours = await asyncio.gather(trials("stock", stock_pool), trials("ours", our_pool))
        check = await asyncpg.connect(dsn)
        done = {r["key"]: r["completions"] for r in await check.fetch("SELECT * FROM bench_done")}
        await check.close()
        for pool in (stock_pool, our_pool):
            await pool.aclose()
        print(
            f"\nrecovery after SIGKILL, {TRIALS} trials each ({time.monotonic() - started:.0f} s)"
        )
        print(f"{'worker':<34}{'median s':>10}{'min s':>8}{'max s':>8}{'lost':>6}{'doubled':>9}")
        for label, flavour, values in (
            (f"stock arq (job_timeout={STOCK_JOB_TIMEOUT_S} s)", "stock", stock),
            ("contact360 (15 s lease, 5 s renew)", "ours", ours),
        ):
            keys = [f"{flavour}-{n}" for n in range(TRIALS)]
            lost = sum(key not in done for key in keys)
            doubled = sum(done.get(key, 0) > 1 for key in keys)
            print(
                f"{label:<34}{statistics.median(values):>10.1f}{min(values):>8.1f}"
                f"{max(values):>8.1f}{lost:>6}{doubled:>9}"
            )
        print("stock arq: job_timeout + 10 s (arq default 300 s: ~310 s; 1800+30 s: ~1840 s)")
        print(f"status with 100,000 queued jobs: median {statistics.median(status_s):.3f} s")
    finally:
        redis_server.kill()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--stock-worker" in sys.argv:
        asyncio.run(run_stock_worker())
    else:
        asyncio.run(main())

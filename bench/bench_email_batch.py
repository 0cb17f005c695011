"""Email at the provider's real limit: batches against a fake Resend enforcing N requests/s.

    make bench-email-batch      # or: .venv/bin/python bench/bench_email_batch.py [--campaign 50000]

The loopback Resend (tests/support/provider_server.py, in a thread of this process) answers
every request after 200 ms and answers 429 `retry-after` past N requests in a sliding second
(N = 5, Resend's documented default, https://resend.com/docs/api-reference/rate-limit). One
default worker process runs with EMAIL_RATE_LIMIT_PER_S unset, i.e. that same default. Runs:

- a waitlist campaign of `--campaign` due entries, sent by one hourly tick;
- a burst of `--burst` welcome emails (`JobsClient.send_welcome_email`), with `--singles`
  `send_email` singles enqueued one at a time during it: their enqueue-to-sent latency;
- the same singles' path with batching switched off in the worker process (one email per
  request, `bench_email_batch.py worker single`: no switch in the product), on `--unbatched`
  campaign entries, for comparison.

Reported: emails/s and requests/s from the first enqueue to the last `sent` (the burst to its
own last welcome email; the singles trickle on for ~15 s), 429s, p50/p95 latency (outbox row
written at enqueue -> `sent_at`), and whether every email was delivered exactly once (the
fake's deliveries by recipient). Goal: >= 90% of N x 100 emails/s. BENCH_PROFILE=<file> runs
the batching worker under cProfile (see `run_worker`).

Uses a database of its own (dropped at the end) and Redis db BENCH_REDIS_DB (default 13),
which must be empty or the test rig's own; it is flushed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
RIG_MARKER = b"c360:test-rig-owns-this-db"
RATE_PER_S = 5
ANSWER_DELAY_S = 0.2


def run_worker(variant: str) -> int:
    """`python -m worker work default` in this process; `single`: one email per request.

    With BENCH_PROFILE=<file>, the worker runs under cProfile and writes its stats there when
    it stops (`python -m pstats <file>`): where the worker's CPU goes per email.
    """
    from worker.cli import main as worker_main

    if variant == "single":
        import jobs.email.batcher

        jobs.email.batcher.batch_capacity = lambda provider: 1  # type: ignore[assignment]
    profile_to = os.environ.get("BENCH_PROFILE")
    if not profile_to or variant != "batch":
        return worker_main(["work", "default"])
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(worker_main, ["work", "default"])
    finally:
        profiler.dump_stats(profile_to)


def start(variant: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(Path(__file__)), "worker", variant]
    with log.open("wb") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_for(predicate: Any, what: str, timeout_s: float = 1200) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def sent_count(db: Any, prefix: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM email_messages WHERE status = 'sent' AND idempotency_key LIKE $1",
            prefix + "%",
        )
    )


async def latencies_s(db: Any, prefix: str) -> list[float]:
    rows = await db.fetch(
        "SELECT extract(epoch FROM sent_at - created_at) AS s FROM email_messages "
        "WHERE status = 'sent' AND idempotency_key LIKE $1",
        prefix + "%",
    )
    return [float(r["s"]) for r in rows]


class Run:
    """Counts at the fake between two moments."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.t0 = time.perf_counter()
        self.requests0 = server.request_count
        self.limited0 = server.rate_limited

    def row(self, name: str, emails: int, extra: str = "") -> str:
        seconds = time.perf_counter() - self.t0
        requests = self.server.request_count - self.requests0
        limited = self.server.rate_limited - self.limited0
        return (
            f"| {name} | {emails:,} | {seconds:.1f} | {emails / seconds:,.1f} | "
            f"{requests / seconds:.2f} | {limited} | {extra} |"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description="email batching benchmark")
    parser.add_argument("--campaign", type=int, default=50_000)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--singles", type=int, default=20)
    parser.add_argument("--unbatched", type=int, default=150)
    args = parser.parse_args()

    from tests.support.provider_server import ProviderServer
    from worker.client import JobsClient
    from worker.settings import Settings

    redis = Redis.from_url(REDIS_URL)
    keys = await redis.keys("*")
    if keys and RIG_MARKER not in keys:  # the test rig's rule: never eat others' data
        sys.exit(f"Redis db {REDIS_DB} holds keys of others; set BENCH_REDIS_DB to a free one")
    await redis.flushdb()
    database = f"c360_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    logs = Path(tempfile.mkdtemp(prefix="bench-email-batch-"))
    server = ProviderServer(default_delay_s=ANSWER_DELAY_S, record=False, bodies=False).start()
    server.rate_limit_per_s = RATE_PER_S
    database_url = f"{PG_SERVER.replace('postgresql://', 'postgresql+asyncpg://')}/{database}"
    env = os.environ | {
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "EMAIL_PROVIDER": "resend",
        "EMAIL_API_KEY": "bench",
        "EMAIL_API_BASE_URL": server.base_url,
        "APP_URL": "https://app.contact360.test",
        "SECRET_KEY": "bench-secret-key-that-signs-the-links-0123456789",
        "WORKER_MAX_JOBS_PER_PROCESS": "1000000",  # one process measured: no recycling
        "PYTHONPATH": str(ROOT),
    }
    env.pop("EMAIL_RATE_LIMIT_PER_S", None)  # the provider's default: what is measured
    settings = Settings(
        database_url=database_url, redis_url=REDIS_URL, app_url=env["APP_URL"],
        secret_key=env["SECRET_KEY"], waitlist_confirm=False,
    )  # fmt: skip
    try:
        migrate = [sys.executable, "-m", "worker", "migrate"]
        subprocess.run(migrate, env=env, cwd=ROOT, check=True)  # noqa: ASYNC221 (set-up, untimed)
        db = await asyncpg.connect(f"{PG_SERVER}/{database}")
        print(
            f"fake Resend: {ANSWER_DELAY_S * 1000:.0f} ms an answer, {RATE_PER_S} requests/s "
            f"(429 past it); goal >= {0.9 * RATE_PER_S * 100:.0f} emails/s; logs in {logs}\n"
        )
        print("| run | emails | s | emails/s | requests/s | 429s | latency p50/p95 s |")
        print("|---|---|---|---|---|---|---|")
        async with JobsClient.from_settings(settings) as client:
            await bench(args, env, db, client, server, logs, redis)
        await db.close()
        delivered = Counter(tuple(d.json["to"]) for d in server.delivered)
        total = args.campaign + args.burst + args.singles + args.unbatched
        once = len(delivered) == total and set(delivered.values()) == {1}
        print(f"\nevery email delivered exactly once: {once} ({len(delivered):,} recipients)")
    finally:
        server.stop()
        await redis.flushdb()
        if RIG_MARKER in keys:
            await redis.set(RIG_MARKER, "1")
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def bench(
    args: Any, env: dict[str, str], db: Any, client: Any, server: Any, logs: Path, redis: Redis
) -> None:
    async def ready() -> bool:
        return bool(await redis.keys("default:health-check:*"))

    await add_entries(db, "c", args.campaign)
    await db.execute(
        "INSERT INTO users (email, name, plan) SELECT 'u' || g || '@example.com', 'Una', 'pro' "
        "FROM generate_series(1, $1) g",
        args.burst,
    )
    worker = start("batch", env, logs / "batch.log")
    try:
        await wait_for(ready, "the worker to start", 60)
        run = Run(server)
        await client.redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")

        async def campaign_sent() -> bool:
            return await sent_count(db, "waitlist/") >= args.campaign

        await wait_for(campaign_sent, "the campaign")
        print(run.row("batches: waitlist campaign (one tick)", args.campaign), flush=True)

        users = [r["id"] for r in await db.fetch("SELECT id FROM users ORDER BY email")]
        run = Run(server)

        async def singles() -> None:
            for n in range(args.singles):
                await client.send_email(
                    f"single{n}@example.com", "Single", "<p>one</p>", idempotency_key=f"s{n}"
                )
                await asyncio.sleep(max(0.05, 15 / max(args.singles, 1)))

        async def burst() -> None:
            for start_at in range(0, len(users), 200):
                chunk = users[start_at : start_at + 200]
                await asyncio.gather(*(client.send_welcome_email(u) for u in chunk))

        async def burst_sent() -> bool:
            return await sent_count(db, "welcome/") >= args.burst

        async def burst_then_measure() -> str:
            await burst()
            await wait_for(burst_sent, "the burst")
            welcome = await latencies_s(db, "welcome/")
            latency = f"welcome {pct(welcome, 50):.1f}/{pct(welcome, 95):.1f}"
            return run.row("batches: welcome burst", args.burst, latency)

        # The singles trickle in over ~15 s, during the burst and after it: the burst's rate is
        # measured to its own last `sent`, the singles' latency on their own rows.
        burst_row, _ = await asyncio.gather(burst_then_measure(), singles())
        print(burst_row, flush=True)

        async def singles_sent() -> bool:
            return await sent_count(db, "caller/s") >= args.singles

        await wait_for(singles_sent, "the singles")
        single = await latencies_s(db, "caller/s")
        print(
            f"| batches: `send_email` singles during the burst | {args.singles} | | | | | "
            f"singles {pct(single, 50):.2f}/{pct(single, 95):.2f} |",
            flush=True,
        )
    finally:
        stop(worker)
    await add_entries(db, "x", args.unbatched)
    worker = start("single", env, logs / "single.log")
    try:
        await wait_for(ready, "the one-per-request worker to start", 60)
        run = Run(server)
        await client.redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")

        async def unbatched_sent() -> bool:
            return await sent_count(db, "waitlist/") >= args.campaign + args.unbatched

        await wait_for(unbatched_sent, "the one-per-request campaign")
        print(run.row("one email per request: campaign", args.unbatched), flush=True)
    finally:
        stop(worker)


async def add_entries(db: Any, prefix: str, count: int) -> None:
    await db.execute(
        "INSERT INTO waitlist_entries (email, name, campaign_step, next_email_at, created_at, "
        "confirmed_at) SELECT $1 || g || '@example.com', 'Wendy', 1, now() - interval '1 hour', "
        "now() - interval '3 days', now() - interval '3 days' FROM generate_series(1, $2) g",
        prefix,
        count,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(run_worker(sys.argv[2]))
    asyncio.run(main())

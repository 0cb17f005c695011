"""Email throughput of one default worker process, side by side with stock arq and Celery.

    make bench-email            # or: .venv/bin/python bench/bench_email.py [--emails 2000]

The loopback provider (tests/support/provider_server.py, its own process) answers every send
after 200 ms; the rate limit is set out of the way. Reported per setup: sends/s from the first
enqueue to the last send, and the worker's CPU ms per send (psutil, worker processes only,
start-up excluded). Setups:

- ours, `send_email` jobs: one arq job per email through the outbox (PostgreSQL claim and
  settle per send), on the default queue's settings (worker.main.QUEUE_CONFIGS);
- ours, campaign: the same number of due waitlist entries sent by one
  `send_waitlist_campaign_hourly` job (pages of 1,000, 50 sends in flight);
- stock arq: the same Resend POST as a bare arq job on an `httpx.AsyncClient()` with its default
  transport, with arq's defaults (max_jobs=10, poll_delay=0.5) and with max_jobs=500;
- Celery 5 prefork, 4 processes, blocking `httpx.Client` sends (skipped if celery is missing).

Then the cost of the metrics and trace hooks of the job wrapper (worker/job.py), in interleaved
rounds of `send_email` runs (the order rotates each round): "without" is a worker whose
duration and queue-wait histograms (worker/stats.py) and trace span (worker/tracing.py) are
patched off in the worker process itself (`bench_email.py ours-worker without`: no switch in
the product); "SDK, no provider" the worker as shipped with OpenTelemetry installed and nothing
configured; "provider + batch" a TracerProvider with a BatchSpanProcessor to an exporter that
drops every span. Reported: the median sends/s of each, and the median of the per-round ratios.

`--recycling` instead compares recycling (worker/recycle.py) at the default settings, and with
the old per-process count of 1,000, through `python -m worker run --queue default` (the
supervisor replaces a recycled worker), with recycling off (one `work default` process whose
recycler hook is patched away in the process: `bench_email.py recycling-off-worker`), in
interleaved rounds of the same `send_email` workload. Reported: sends/s, recycles counted, the
longest pause between two sends, the median ratio to "off", the seconds a recycle costs, and
that cost at the default count.

Uses a database of its own (dropped at the end) and Redis db BENCH_REDIS_DB (default 13),
which must be empty or the test rig's own (TEST_REDIS_DB); it is flushed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncpg
import psutil
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parent.parent
PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
RIG_MARKER = b"c360:test-rig-owns-this-db"
STOCK_QUEUE = "bench:stock"
DONE_KEY = "bench:email:done"
CELERY_QUEUE = "bench-email-celery"
PAYLOAD = {
    "from": "Contact360 <no-reply@contact360.test>",
    "subject": "Benchmark",
    "html": "<p>Hello from the benchmark</p>",
}
sys.path.insert(0, str(ROOT))


@dataclass
class Result:
    setup: str
    emails: int
    seconds: float
    cpu_s: float

    def row(self) -> str:
        rate = self.emails / self.seconds
        cpu_ms = 1000 * self.cpu_s / self.emails
        return f"| {self.setup} | {self.emails:,} | {rate:,.0f} | {cpu_ms:.2f} |"


def cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (Celery's prefork pool)."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


# ---- stock arq: the baseline job, run with `bench_email.py stock-worker` ---------------------


async def _stock_startup(ctx: dict[str, Any]) -> None:
    import httpx

    ctx["http"] = httpx.AsyncClient()  # as stock users would: httpx's own transport


async def _stock_shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].aclose()


async def stock_send(ctx: dict[str, Any], to: str, key: str) -> None:
    response = await ctx["http"].post(
        f"{os.environ['BENCH_BASE_URL']}/emails",
        json=PAYLOAD | {"to": [to]},
        headers={"Authorization": "Bearer bench", "Idempotency-Key": key},
    )
    response.raise_for_status()
    await ctx["redis"].incr(DONE_KEY)


def run_stock_worker(max_jobs: int) -> None:
    from arq.worker import Worker, func

    worker = Worker(
        functions=[func(stock_send, name="stock_send")],  # type: ignore[arg-type]
        queue_name=STOCK_QUEUE,
        redis_settings=RedisSettings.from_dsn(REDIS_URL),
        on_startup=_stock_startup,
        on_shutdown=_stock_shutdown,
        max_jobs=max_jobs,
        health_check_key=f"{STOCK_QUEUE}:health-check",
    )
    worker.run()


# ---- Celery prefork: the blocking baseline ------------------------------------------------------


def make_celery_app() -> Any:
    import httpx
    import redis
    from celery import Celery

    app = Celery("bench_email", broker=REDIS_URL)
    app.conf.update(task_default_queue=CELERY_QUEUE, worker_hijack_root_logger=False)
    state: dict[str, Any] = {}

    @app.task(name="bench_send", ignore_result=True)  # type: ignore[untyped-decorator]
    def bench_send(to: str, key: str) -> None:
        if "http" not in state:  # one client per pool process, made after the fork
            state["http"] = httpx.Client()
            state["redis"] = redis.Redis.from_url(REDIS_URL)
        response = state["http"].post(
            f"{os.environ['BENCH_BASE_URL']}/emails",
            json=PAYLOAD | {"to": [to]},
            headers={"Authorization": "Bearer bench", "Idempotency-Key": key},
        )
        response.raise_for_status()
        state["redis"].incr(DONE_KEY)

    return app


# Only the Celery worker process (started with BENCH_CELERY=1) builds the app at import.
celery_app = make_celery_app() if os.environ.get("BENCH_CELERY") == "1" else None


# ---- ours with and without the hooks: `bench_email.py ours-worker VARIANT` -------------------

HOOK_VARIANTS = {
    "without": "without histograms and span",
    "sdk": "SDK installed, no provider",
    "batch": "provider + BatchSpanProcessor, no-op exporter",
}


def run_ours_worker(variant: str) -> int:
    """`python -m worker work default` in this process, its hooks set up as `variant` says."""
    from worker import stats, tracing
    from worker.cli import main as worker_main

    if variant == "without":
        record = stats.record

        async def counts_only(*args: Any, **kwargs: Any) -> None:
            await record(*args, **(kwargs | {"duration_s": None, "queue_wait_s": None}))

        stats.record = counts_only  # type: ignore[assignment]
        tracing.enabled = lambda: False  # type: ignore[assignment]
    elif variant == "batch":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Drop(SpanExporter):
            dropped = 0

            def export(self, spans: Any) -> SpanExportResult:
                Drop.dropped += len(spans)
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)
        code = worker_main(["work", "default"])
        provider.shutdown()
        print(f"spans exported: {Drop.dropped}", flush=True)  # the bench checks it
        return code
    return worker_main(["work", "default"])


# ---- the harness -------------------------------------------------------------------------------


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_for(predicate: Any, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def measure(name: str, pid: int, emails: int, enqueue: Any, done: Any, ready: Any) -> Result:
    await wait_for(ready, f"{name} to start", 60)
    await asyncio.sleep(0.5)  # let start-up work settle before the CPU baseline
    cpu0, t0 = cpu_s(pid), time.perf_counter()
    await enqueue()
    await wait_for(done, f"{name} to send {emails}")
    result = Result(name, emails, time.perf_counter() - t0, cpu_s(pid) - cpu0)
    print(result.row(), flush=True)
    return result


async def enqueue_many(
    pool: ArqRedis, function: str, queue: str, items: list[dict[str, Any]]
) -> None:
    for start_at in range(0, len(items), 200):
        chunk = items[start_at : start_at + 200]
        await asyncio.gather(*(pool.enqueue_job(function, _queue_name=queue, **k) for k in chunk))


async def main() -> None:
    parser = argparse.ArgumentParser(description="email throughput benchmark")
    parser.add_argument("--emails", type=int, default=2000)
    parser.add_argument("--slow-emails", type=int, default=300, help="for the ~20/s baselines")
    parser.add_argument("--hook-rounds", type=int, default=5, help="0: skip the hooks' cost")
    parser.add_argument("--only-hooks", action="store_true", help="skip the side-by-side table")
    parser.add_argument("--recycling", action="store_true", help="only recycling's cost")
    parser.add_argument("--recycling-emails", type=int, default=5000)
    parser.add_argument("--recycling-rounds", type=int, default=3)
    args = parser.parse_args()
    n, slow_n = args.emails, args.slow_emails

    redis = Redis.from_url(REDIS_URL)
    keys = await redis.keys("*")
    if keys and RIG_MARKER not in keys:  # the same rule as the test rig: never eat others' data
        sys.exit(f"Redis db {REDIS_DB} holds keys of others; set BENCH_REDIS_DB to a free one")
    await redis.flushdb()
    database = f"c360_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    await admin.execute(f'CREATE DATABASE "{database}"')
    logs = Path(tempfile.mkdtemp(prefix="bench-email-"))
    # Set-up before any timing: blocking here costs the measurements nothing.
    server = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "tests.support.provider_server", "--delay-ms", "200"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None
    base_url = server.stdout.readline().decode().strip()
    env = os.environ | {
        "DATABASE_URL": f"{PG_SERVER.replace('postgresql://', 'postgresql+asyncpg://')}/{database}",
        "REDIS_URL": REDIS_URL,
        "EMAIL_PROVIDER": "resend",
        "EMAIL_API_KEY": "bench",
        "EMAIL_API_BASE_URL": base_url,
        "EMAIL_RATE_LIMIT_PER_S": "1000000",
        # Campaign email is not sent without its signed links' base URL and key.
        "APP_URL": "https://app.contact360.test",
        "SECRET_KEY": "bench-secret-key-that-signs-the-links-0123456789",
        # One process's throughput is measured: no recycling, since nothing restarts it here
        # (`--recycling` measures recycling under the supervisor).
        "WORKER_MAX_JOBS_PER_PROCESS": "1000000",
        "BENCH_BASE_URL": base_url,
        "PYTHONPATH": str(ROOT),
    }
    pool = await create_pool(RedisSettings.from_dsn(REDIS_URL))
    results: list[Result] = []
    try:
        migrate = [sys.executable, "-m", "worker", "migrate"]
        subprocess.run(migrate, env=env, cwd=ROOT, check=True)  # noqa: ASYNC221 (set-up, untimed)
        db = await asyncpg.connect(f"{PG_SERVER}/{database}")
        print(f"provider answers in 200 ms; logs in {logs}\n")
        if args.recycling:
            rounds = args.recycling_rounds
            await bench_recycling(env, redis, db, logs, args.recycling_emails, rounds)
        elif not args.only_hooks:
            print("| setup | emails | sends/s | worker CPU ms/send |\n|---|---|---|---|")
            results += await bench_ours(env, pool, redis, db, logs, n)
            for max_jobs, count in ((10, slow_n), (500, n)):
                results.append(await bench_stock(env, pool, redis, logs, max_jobs, count))
            celery = await bench_celery(env, redis, logs, slow_n)
            if celery is None:
                print("| Celery 5 prefork 4 | - | not run: celery is not installed | - |")
        if args.hook_rounds and not args.recycling:
            await bench_hooks(env, redis, db, logs, n, args.hook_rounds)
        await db.close()
    finally:
        await pool.aclose()
        server.terminate()
        server.wait()
        await redis.flushdb()
        if RIG_MARKER in keys:
            await redis.set(RIG_MARKER, "1")
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def bench_ours(
    env: dict[str, str], pool: ArqRedis, redis: Redis, db: Any, logs: Path, n: int
) -> list[Result]:
    from worker.routes import SEND_EMAIL, SEND_WAITLIST_CAMPAIGN_HOURLY, enqueue
    from worker.serialization import serialize

    ours = await create_pool(RedisSettings.from_dsn(REDIS_URL), job_serializer=serialize)
    worker = start([sys.executable, "-m", "worker", "work", "default"], env, logs / "ours.log")

    async def ready() -> bool:
        return bool(await redis.keys("default:health-check:*"))

    async def sent(total: int) -> bool:
        return (
            int(await db.fetchval("SELECT count(*) FROM email_messages WHERE status='sent'"))
            >= total
        )

    items = [
        {"to": f"r{i}@example.com", "subject": "Benchmark", "html": PAYLOAD["html"]}
        for i in range(n)
    ]
    try:
        jobs = await measure(
            "ours: one `send_email` job per email",
            worker.pid,
            n,
            lambda: enqueue_many(ours, SEND_EMAIL.name, SEND_EMAIL.queue, items),
            lambda: sent(n),
            ready,
        )
        await db.execute(
            "INSERT INTO waitlist_entries (email, campaign_step, next_email_at, created_at) "
            "SELECT 'w' || i || '@example.com', 1, now() - interval '1 hour', "
            "now() - interval '3 days' FROM generate_series(1, $1) i",
            n,
        )
        campaign = await measure(
            "ours: one campaign job (100 in flight)",
            worker.pid,
            n,
            lambda: enqueue(ours, SEND_WAITLIST_CAMPAIGN_HOURLY, None),
            lambda: sent(2 * n),
            ready,
        )
    finally:
        stop(worker)
        await ours.aclose()
    return [jobs, campaign]


async def bench_hooks(
    env: dict[str, str], redis: Redis, db: Any, logs: Path, n: int, rounds: int
) -> None:
    from worker.routes import SEND_EMAIL
    from worker.serialization import serialize
    from worker.stats import metrics_key

    print(f"\nhooks: {rounds} interleaved rounds of {n:,} `send_email` jobs\n", flush=True)
    print("| round | variant | emails | sends/s | worker CPU ms/send |\n|---|---|---|---|---|")
    variants = list(HOOK_VARIANTS)
    rates: dict[str, list[float]] = {variant: [] for variant in variants}
    items = [
        {"to": f"h{i}@example.com", "subject": "Benchmark", "html": PAYLOAD["html"]}
        for i in range(n)
    ]
    for round_no in range(rounds):
        shift = round_no % len(variants)  # rotate, so no variant always runs first or last
        for variant in variants[shift:] + variants[:shift]:
            # The same starting state for every run: an empty outbox and an empty Redis db.
            await db.execute("TRUNCATE email_messages")
            await redis.flushdb()
            ours = await create_pool(RedisSettings.from_dsn(REDIS_URL), job_serializer=serialize)
            command = [sys.executable, __file__, "ours-worker", variant]
            worker = start(command, env, logs / f"hooks-{round_no}-{variant}.log")

            async def ready() -> bool:
                return bool(await redis.keys("default:health-check:*"))

            async def sent() -> bool:
                count = await db.fetchval("SELECT count(*) FROM email_messages WHERE status='sent'")
                return int(count) >= n

            try:
                result = await measure(
                    f"{round_no + 1} | {HOOK_VARIANTS[variant]}",
                    worker.pid,
                    n,
                    lambda: enqueue_many(ours, SEND_EMAIL.name, SEND_EMAIL.queue, items),  # noqa: B023
                    sent,
                    ready,
                )
            finally:
                stop(worker)
                await ours.aclose()
            # Check that each variant measured what it says: histograms kept or not, spans.
            fields = await redis.hkeys(metrics_key(SEND_EMAIL.queue))
            histograms = any(b"|duration|" in field for field in fields)
            log = (logs / f"hooks-{round_no}-{variant}.log").read_text(errors="replace")
            spans = re.search(r"spans exported: [1-9]", log) is not None
            if histograms != (variant != "without") or (variant == "batch" and not spans):
                sys.exit(f"the {variant} run did not run as it should: see {logs}")
            rates[variant].append(n / result.seconds)
    print("\n| variant | median sends/s | median of per-round ratios to without |")
    print("|---|---|---|")
    for variant in variants:
        ratios = [rate / base for rate, base in zip(rates[variant], rates["without"], strict=True)]
        print(
            f"| {HOOK_VARIANTS[variant]} | {statistics.median(rates[variant]):,.0f} "
            f"| {statistics.median(ratios):.3f} |",
            flush=True,
        )


# ---- recycling's cost: `bench_email.py --recycling` ----------------------------------------

# The bench's own env turns the count off (WORKER_MAX_JOBS_PER_PROCESS=1000000); each variant
# sets both limits or, for "default", leaves them unset as a deploy would.
RECYCLING_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "off": ("recycling off (no recycler, no supervisor)", {}),
    "default": ("recycling at the default settings", {}),
    "per-1000": ("WORKER_MAX_JOBS_PER_PROCESS=1000 (the old default)",
                 {"WORKER_MAX_JOBS_PER_PROCESS": "1000"}),
}  # fmt: skip


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children, the ones already reaped too (recycled)."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system + times.children_user + times.children_system
    return total


def run_worker_without_recycler() -> int:
    """`python -m worker work default` in this process with the recycler's job hook removed."""
    import worker.main
    from worker.cli import main as worker_main

    worker.main.recycle_after_job_end = None  # type: ignore[assignment]
    return worker_main(["work", "default"])


async def bench_recycling(
    env: dict[str, str], redis: Redis, db: Any, logs: Path, n: int, rounds: int
) -> None:
    from worker.main import QUEUE_CONFIGS
    from worker.recycle import RECYCLES_KEY, job_limit
    from worker.routes import SEND_EMAIL
    from worker.serialization import serialize
    from worker.settings import Settings

    print(f"recycling: {rounds} interleaved rounds of {n:,} `send_email` jobs, under `run`\n")
    print("| round | variant | emails | sends/s | CPU ms/send | recycles | longest pause s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    variants = list(RECYCLING_VARIANTS)
    rates: dict[str, list[float]] = {variant: [] for variant in variants}
    seconds: dict[str, list[float]] = {variant: [] for variant in variants}
    recycled: dict[str, list[int]] = {variant: [] for variant in variants}
    cpu_per_send_ms: dict[str, list[float]] = {variant: [] for variant in variants}
    items = [
        {"to": f"y{i}@example.com", "subject": "Benchmark", "html": PAYLOAD["html"]}
        for i in range(n)
    ]
    base = {k: v for k, v in env.items() if not k.startswith("WORKER_MAX_")}
    # Round -1 warms PostgreSQL and the page cache up and is not counted.
    for round_no in range(-1, rounds):
        shift = round_no % len(variants)
        for variant in variants[shift:] + variants[:shift] if round_no >= 0 else ["off"]:
            await db.execute("TRUNCATE email_messages")
            await redis.flushdb()
            label, limits = RECYCLING_VARIANTS[variant]
            ours = await create_pool(RedisSettings.from_dsn(REDIS_URL), job_serializer=serialize)
            command = [sys.executable, "-m", "worker", "run", "--queue", "default"]
            if variant == "off":
                command = [sys.executable, __file__, "recycling-off-worker"]
            supervisor = start(command, base | limits, logs / f"recycling-{round_no}-{variant}.log")

            async def ready() -> bool:
                return bool(await redis.keys("default:health-check:*"))

            async def sent() -> bool:
                count = await db.fetchval("SELECT count(*) FROM email_messages WHERE status='sent'")
                return int(count) >= n

            try:
                await wait_for(ready, f"{label} to start", 60)
                await asyncio.sleep(0.5)
                t0, cpu0 = time.perf_counter(), tree_cpu_s(supervisor.pid)
                await enqueue_many(ours, SEND_EMAIL.name, SEND_EMAIL.queue, items)
                await wait_for(sent, f"{label} to send {n}")
                elapsed_s = time.perf_counter() - t0
                cpu_ms = 1000 * (tree_cpu_s(supervisor.pid) - cpu0) / n
            finally:
                stop(supervisor)
                await ours.aclose()
            raw_count = await cast(Awaitable[bytes | None], redis.hget(RECYCLES_KEY, "default"))
            count = int(raw_count or 0)
            # The longest stretch without a send: a recycle's gap shows here, load or not.
            pause_s = await db.fetchval(
                "SELECT extract(epoch FROM max(gap)) FROM (SELECT sent_at - lag(sent_at) "
                "OVER (ORDER BY sent_at) AS gap FROM email_messages) gaps"
            )
            shown = round_no + 1 if round_no >= 0 else "warm-up"
            print(
                f"| {shown} | {label} | {n:,} | {n / elapsed_s:,.0f} | {cpu_ms:.2f} | {count} "
                f"| {float(pause_s):.2f} |",
                flush=True,
            )
            if round_no < 0:
                continue
            rates[variant].append(n / elapsed_s)
            cpu_per_send_ms[variant].append(cpu_ms)
            seconds[variant].append(elapsed_s)
            recycled[variant].append(count)
    print(
        "\n| variant | median sends/s | median ratio to off | median CPU ms/send "
        "| CPU ratio to off | recycles per run |\n|---|---|---|---|---|---|"
    )
    for variant in variants:
        ratios = [rate / off for rate, off in zip(rates[variant], rates["off"], strict=True)]
        cpu = cpu_per_send_ms[variant]
        cpu_ratios = [ms / off for ms, off in zip(cpu, cpu_per_send_ms["off"], strict=True)]
        print(
            f"| {RECYCLING_VARIANTS[variant][0]} | {statistics.median(rates[variant]):,.0f} "
            f"| {statistics.median(ratios):.3f} | {statistics.median(cpu):.2f} "
            f"| {statistics.median(cpu_ratios):.3f} | {statistics.median(recycled[variant]):g} |"
        )
    # A recycle's own price, from the runs that recycle every 1,000 jobs, spread over the
    # default count: what recycling costs a default worker that sends without pause.
    lost_s = [
        (slow - fast) / max(count, 1)
        for slow, fast, count in zip(
            seconds["per-1000"], seconds["off"], recycled["per-1000"], strict=True
        )
    ]
    default_jobs = job_limit(Settings(), QUEUE_CONFIGS["default"].max_jobs)
    per_recycle_s = statistics.median(lost_s)
    off_rate = statistics.median(rates["off"])
    share = max(per_recycle_s, 0.0) / (default_jobs / off_rate + max(per_recycle_s, 0.0))
    print(
        f"\none recycle costs {per_recycle_s:.2f} s of sending (median of {rounds}); at the "
        f"default count ({default_jobs:,} jobs, {default_jobs / off_rate / 60:.0f} min at "
        f"{off_rate:,.0f}/s) that is {100 * share:.2f}% of throughput",
        flush=True,
    )


async def bench_stock(
    env: dict[str, str], pool: ArqRedis, redis: Redis, logs: Path, max_jobs: int, n: int
) -> Result:
    await redis.delete(DONE_KEY)
    command = [sys.executable, __file__, "stock-worker", str(max_jobs)]
    worker = start(command, env, logs / f"stock-{max_jobs}.log")
    items = [{"to": f"s{i}@example.com", "key": f"stock-{max_jobs}-{i}"} for i in range(n)]

    async def ready() -> bool:
        return bool(await redis.exists(f"{STOCK_QUEUE}:health-check"))

    async def done() -> bool:
        return int(await redis.get(DONE_KEY) or 0) >= n

    label = "defaults (max_jobs=10)" if max_jobs == 10 else f"max_jobs={max_jobs}"
    try:
        return await measure(
            f"stock arq, {label}, httpx default transport",
            worker.pid,
            n,
            lambda: enqueue_many(pool, "stock_send", STOCK_QUEUE, items),
            done,
            ready,
        )
    finally:
        stop(worker)


async def bench_celery(env: dict[str, str], redis: Redis, logs: Path, n: int) -> Result | None:
    try:
        import celery  # noqa: F401
    except ImportError:
        return None
    await redis.delete(DONE_KEY)
    env = env | {"BENCH_CELERY": "1", "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}"}
    command = [sys.executable, "-m", "celery", "-A", "bench_email:celery_app", "worker"]
    command += ["--pool=prefork", "--concurrency=4", "-Q", CELERY_QUEUE, "--loglevel=INFO"]
    log = logs / "celery.log"
    worker = start(command, env, log)
    os.environ["BENCH_CELERY"] = "1"
    app = make_celery_app()
    app.control.purge()

    async def ready() -> bool:
        return "ready." in log.read_text(errors="replace")

    async def enqueue() -> None:
        for i in range(n):
            app.send_task("bench_send", args=(f"c{i}@example.com", f"celery-{i}"))

    async def done() -> bool:
        return int(await redis.get(DONE_KEY) or 0) >= n

    try:
        return await measure(
            "Celery 5 prefork 4, blocking httpx", worker.pid, n, enqueue, done, ready
        )
    finally:
        stop(worker)
        app.control.purge()


if __name__ == "__main__":
    if sys.argv[1:2] == ["stock-worker"]:
        run_stock_worker(int(sys.argv[2]))
    elif sys.argv[1:2] == ["ours-worker"]:
        sys.exit(run_ours_worker(sys.argv[2]))
    elif sys.argv[1:2] == ["recycling-off-worker"]:
        sys.exit(run_worker_without_recycler())
    else:
        asyncio.run(main())

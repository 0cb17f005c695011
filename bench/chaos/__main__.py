"""`make chaos`: a mixed workload under random faults, then every invariant checked.

    .venv/bin/python -m bench.chaos [--duration-s 360] [--scale 1.0] [--seed 1] [--keep]

See bench/chaos/__init__.py for what it does; the workload and fault plan are in
bench/chaos/workload.py. Exits 1 when any loss, duplication or leftover count is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.chaos import checks
from bench.chaos.data import Population, populate
from bench.chaos.driver import Driver
from bench.chaos.env import Environment, provision, teardown
from bench.chaos.faults import Injector
from bench.chaos.report import render
from bench.chaos.workers import WorkerPool
from bench.chaos.workload import Workload, build_workload, plan_faults
from worker.client import JobsClient
from worker.settings import Settings

READY_TIMEOUT_S = 90.0
SETTLED_ROUNDS = 2  # quiet this many checks in a row (2 s apart)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=420, help="the faulted phase")
    parser.add_argument("--quiet-timeout-s", type=float, default=180, help="bound on the drain")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="rows and emails (0.05 to develop)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--storage",
        choices=("s3", "local"),
        default="s3",
        help="where exports go: S3 multipart uploads (moto) or local files (atomic renames)",
    )
    # Not lower: an email whose claim Redis forgot (the restart) waits out SEND_LEASE_S
    # (120 s) before it is resent, and the reconciler's 60 s plus MAX_RETRIES backoffs of
    # 0.5, 1 and 2 times this must outlast it, or the row is given up to `review`.
    parser.add_argument("--retry-base-delay-s", type=float, default=20.0)
    parser.add_argument("--report", type=Path, default=Path("bench/out/chaos-report.md"))
    parser.add_argument("--keep", action="store_true", help="keep the database, files and logs")
    return parser.parse_args(argv)


async def wait_ready(redis: aioredis.Redis, pool: WorkerPool) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    wanted = {slot.queue for slot in pool.slots}
    while time.monotonic() < deadline:
        seen = {
            queue
            for queue in wanted
            async for _ in redis.scan_iter(match=f"{queue}:health-check:*")
        }
        if seen == wanted:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(
        f"workers did not report in within {READY_TIMEOUT_S:g} s (logs in {pool.log_dir})"
    )


async def settled(
    env: Environment, driver: Driver, population: Population, workload: Workload
) -> dict[str, int]:
    """What keeps the soak from being quiet; empty when nothing is left to do."""
    connection = await asyncpg.connect(env.dsn)
    redis = aioredis.Redis.from_url(env.redis.url)
    try:
        waiting = {k: v for k, v in (await checks.open_work(connection, redis)).items() if v}
        finished = await connection.fetch(
            "SELECT user_id FROM contact_import_jobs"
            " WHERE status = 'completed' AND user_id = ANY($1)",
            [importer.user_id for importer in population.importers],
        )
    finally:
        await connection.close()
        await redis.aclose()
    unexported = {row["user_id"] for row in finished} - driver.exported_importers
    if unexported:
        waiting["finished imports not yet exported"] = len(unexported)
    delivered = checks.delivered_recipients(env)
    if missing := len(checks.expected_recipients(workload) - set(delivered)):
        waiting["emails not yet delivered"] = missing
    marketed = env.provider.marketing_contacts
    if missing := len(checks.expected_marketing(population, workload) - set(marketed)):
        waiting["contacts not yet in SendGrid"] = missing
    return waiting


async def soak(args: argparse.Namespace) -> int:
    started_s = args.started_s = time.monotonic()
    workload = build_workload(args.scale, args.seed)
    plan = plan_faults(args.duration_s, args.seed)
    env = await provision(args.storage)
    print(
        f"environment: database {env.database}, redis :{env.redis.port}, S3 :{env.moto.port}, "
        f"fake providers {env.provider.base_url}, files {env.base_dir}"
    )
    failed = True
    try:
        population = await populate(env, workload)
        print(f"workload: imports {[i.rows for i in workload.imports]} rows, "
              f"{workload.emails} emails, {workload.seeded_exports} seeded exports "
              f"(set up in {time.monotonic() - started_s:.0f} s)")  # fmt: skip
        pool = WorkerPool(env.worker_env(args.retry_base_delay_s), env.log_dir)
        pool.start()
        values: dict[str, Any] = {name.lower(): v for name, v in env.settings_env().items()}
        settings = Settings(**values)
        injector = Injector(env, pool, args.seed)
        try:
            async with JobsClient.from_settings(settings) as jobs:
                await wait_ready(jobs.redis, pool)
                driver = Driver(jobs, workload, population, args.seed)
                stop_duties = asyncio.Event()
                duties = asyncio.create_task(driver.duties(stop_duties))
                phase_started_s = time.monotonic()
                await asyncio.gather(
                    injector.run(plan, phase_started_s),
                    driver.run_phase(args.duration_s),
                    asyncio.sleep(args.duration_s),
                )
                phase_s = time.monotonic() - phase_started_s
                print(f"faults stopped after {phase_s:.0f} s; reference imports start")
                await asyncio.gather(
                    *(driver.start_import(i, reference=True) for i in population.importers)
                )
                quiet_started_s = time.monotonic()
                rounds, waiting = 0, {"not checked": 1}
                while time.monotonic() - quiet_started_s < args.quiet_timeout_s:
                    waiting = await settled(env, driver, population, workload)
                    rounds = rounds + 1 if not waiting else 0
                    if rounds >= SETTLED_ROUNDS:
                        break
                    await asyncio.sleep(2)
                quiet_s = time.monotonic() - quiet_started_s
                print(
                    f"quiet after {quiet_s:.0f} s"
                    if not waiting
                    else f"NOT quiet after {quiet_s:.0f} s: {waiting}"
                )
                if waiting:
                    for job_id in sorted(checks.RUNNING_SEEN)[:10]:
                        ttl_ms = await jobs.redis.pttl(f"arq:in-progress:{job_id}")
                        print(f"  in progress: {job_id} (lease {ttl_ms} ms)")
                stop_duties.set()
                await duties
                connection = await asyncpg.connect(env.dsn)
                try:
                    left = await checks.open_work(connection, jobs.redis)
                finally:
                    await connection.close()
        finally:
            await pool.stop()
        failed = await report(
            args, env, population, workload, injector, pool, driver, left, phase_s, quiet_s, waiting
        )
    finally:
        await teardown(env, keep=args.keep or failed)
    return 1 if failed else 0


async def report(
    args: argparse.Namespace,
    env: Environment,
    population: Population,
    workload: Workload,
    injector: Injector,
    pool: WorkerPool,
    driver: Driver,
    left: dict[str, int],
    phase_s: float,
    quiet_s: float,
    waiting: dict[str, int],
) -> bool:
    connection = await asyncpg.connect(env.dsn)
    try:
        rows = [
            checks.Row("faults", "worker SIGKILLs", injector.counts["worker_sigkill"]),
            checks.Row(
                "faults", "Redis restarts (kill -9, back empty)", injector.counts["redis_restart"]
            ),
            checks.Row(
                "faults", "pg_terminate_backend bursts", injector.counts["pg_terminate_burst"]
            ),
            checks.Row("faults", "backends terminated", injector.terminated_backends),
            *(
                checks.Row("faults", f"worker exits: {why}", n)
                for why, n in sorted(pool.exits.items())
            ),
            checks.Row(
                "faults",
                "client calls that failed and were retried",
                sum(driver.call_errors.values()),
            ),
            *await checks.check_imports(connection, population),
            *await checks.check_exports(connection, env),
            *await checks.check_emails(connection, env, workload),
            *checks.check_marketing(env, population, workload),
            checks.Row(
                "left",
                "partial exports of killed runs removed by their re-run",
                await asyncio.to_thread(checks.discarded_by_reruns, env),
            ),
            *(checks.Row("left", what, n, must_be_zero=True) for what, n in left.items()),
            *(
                checks.Row("left", what, n, must_be_zero=True)
                for what, n in (await asyncio.to_thread(checks.leftovers, env)).items()
            ),
        ]
    finally:
        await connection.close()
    for what, n in sorted(driver.call_errors.items()):
        print(f"  retried client call {what}: {n}")
    title = (
        f"scale {args.scale:g}, seed {args.seed}, exports to {args.storage}, faults for "
        f"{phase_s:.0f} s, quiet after {quiet_s:.0f} s{'' if not waiting else ' (timed out)'}, "
        f"{time.monotonic() - args.started_s:.0f} s in all"
    )
    text, markdown, ok = render(rows, title)
    print(text)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(markdown)
    print(f"markdown table written to {args.report}")
    return not ok or bool(waiting)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())

"""Import benchmark: the job in a real worker process, side by side with a bare SQL merge and
the old row-by-row ORM import, on one generated file (`make bench-import`).

    python bench/bench_import.py [--rows 1000000] [--small-rows 100000] [--orm-rows 50000]
                                 [--pairs 3]

The bare merge into an empty table and the job into an empty table run in `--pairs`
interleaved pairs (bare, then job, on the same staged rows): this machine's speed drifts by
±15% within minutes, and a pair shares its minute. The table shows medians and each pair's
ratio.

Uses a database of its own (`c360_bench_import`, dropped at the end) on the DATABASE server
given by BENCH_PG_SERVER, and BENCH_REDIS_URL (default db 10, whose keys it removes again).
The job runs in `python bench/bench_import.py --worker-child`: arq's imports worker exactly as
`python -m worker work imports --burst` builds it, plus a loop-lag probe; its peak RSS is
read from wait4(). Prints a markdown table. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import make_contacts_csv
from bench.import_baselines import (
    bare_merge_s,
    drop_bare_staging,
    merge_variants,
    naive_orm,
    stage_for_bare_merge,
)
from db.migrate import upgrade
from worker.client import JobsClient
from worker.import_source import user_import_dir
from worker.settings import Settings

PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
DATABASE = "c360_bench_import"
PROBE_TICK_S = 0.005


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def run_worker_child() -> None:
    """The imports worker in burst mode, with a task measuring how late the loop wakes it."""
    from arq.worker import Worker

    from worker.main import worker_settings

    async def main() -> dict[str, float]:
        worst_s = worst_in_job_s = 0.0
        in_job = False

        async def probe() -> None:
            nonlocal worst_s, worst_in_job_s
            while True:
                before_s = time.perf_counter()
                await asyncio.sleep(PROBE_TICK_S)
                late_s = time.perf_counter() - before_s - PROBE_TICK_S
                worst_s = max(worst_s, late_s)
                if in_job:
                    worst_in_job_s = max(worst_in_job_s, late_s)

        kwargs = worker_settings("imports", Settings(), burst=True)
        lease_start, lease_end = kwargs["on_job_start"], kwargs["on_job_end"]

        async def job_started(ctx: dict[str, Any]) -> None:
            nonlocal in_job
            in_job = True
            await lease_start(ctx)

        async def job_ended(ctx: dict[str, Any]) -> None:
            nonlocal in_job
            in_job = False
            await lease_end(ctx)

        kwargs.update(on_job_start=job_started, on_job_end=job_ended)
        worker = Worker(**kwargs)
        task = asyncio.create_task(probe())
        try:
            await worker.async_run()
        finally:
            task.cancel()
            await worker.close()
        return {"max_block_ms": worst_s * 1000, "job_block_ms": worst_in_job_s * 1000}

    print(json.dumps(asyncio.run(main())))


def _child_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "DATABASE_POOLER": settings.database_pooler,
        "REDIS_URL": settings.redis_url,
        "IMPORT_DIR": str(settings.import_dir),
        "IMPORT_BATCH_ROWS": str(settings.import_batch_rows),
        "LOG_LEVEL": "WARNING",
    }


def _run_child(settings: Settings) -> tuple[float, dict[str, float]]:
    """Run the worker child to completion: peak RSS in MB, max loop blocks in ms."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--worker-child"],
        env=_child_env(settings),
        stdout=subprocess.PIPE,
    )
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.stdout is not None
    out = child.stdout.read().decode()
    if child.returncode != 0:
        raise RuntimeError(f"worker child exited with {child.returncode}: {out}")
    return usage.ru_maxrss / 1024, json.loads(out.splitlines()[-1])


async def run_job(jobs: JobsClient, user_id: uuid.UUID, path: Path) -> dict[str, Any]:
    """Enqueue the import, run a worker process until done; rows/s from the job's timestamps."""
    started_s = time.perf_counter()
    status = await jobs.import_contacts(user_id, str(path))
    rss_mb, blocks_ms = await asyncio.to_thread(_run_child, jobs.settings)
    wall_s = time.perf_counter() - started_s
    final = await jobs.import_status(status.id)
    assert final.status == "completed", final
    assert final.started_at is not None and final.finished_at is not None
    job_s = (final.finished_at - final.started_at).total_seconds()
    return {
        "rows": final.processed_rows,
        "job_s": job_s,
        "wall_s": wall_s,
        "rss_mb": rss_mb,
        "block_ms": blocks_ms["max_block_ms"],
        "job_block_ms": blocks_ms["job_block_ms"],
        "counts": (final.created_count, final.updated_count, final.error_count),
    }


async def _truncate(connection: asyncpg.Connection) -> None:
    await connection.execute("TRUNCATE contacts, companies, contact_import_jobs CASCADE")


async def _clean_redis(import_ids_pattern: str = "*import:*") -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        for pattern in (import_ids_pattern, "imports*"):
            async for key in client.scan_iter(match=pattern, count=1000):
                await client.delete(key)
    finally:
        await client.aclose()


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="c360-bench-import-"))
    import_dir = work / "imports"
    settings = Settings(
        database_url=f"{PG_SERVER}/{DATABASE}",
        redis_url=REDIS_URL,
        import_dir=import_dir,
        import_batch_rows=args.batch_rows,
    )
    # The worker reads a user's files only from their own directory, IMPORT_DIR/<user_id>/.
    user_id = uuid.uuid4()
    home = user_import_dir(settings, user_id)
    home.mkdir(parents=True)
    big, small = home / "big.csv", home / "small.csv"
    make_contacts_csv.main([str(big), "--rows", str(args.rows)])
    make_contacts_csv.main([str(small), "--rows", str(args.small_rows)])
    await _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await upgrade(settings.database)
    dsn = f"{PG_SERVER}/{DATABASE}"
    pg = await asyncpg.connect(dsn)
    results: dict[str, Any] = {}
    try:
        await pg.execute("INSERT INTO users (id, email) VALUES ($1, 'bench@x.io')", user_id)
        print("bare SQL merge: staging the rows ...", file=sys.stderr)
        results["copy_s"] = await stage_for_bare_merge(pg, big)
        async with JobsClient.from_settings(settings) as jobs:
            pairs = []
            for pair in range(1, args.pairs + 1):
                print(
                    f"pair {pair}: bare merge, then the job, into an empty table", file=sys.stderr
                )
                await _truncate(pg)
                bare_s = await bare_merge_s(pg, user_id)
                await _truncate(pg)
                pairs.append((bare_s, await run_job(jobs, user_id, big)))
            results["pairs"] = pairs
            print("job: the same file again (every valid row updates) ...", file=sys.stderr)
            results["job_again"] = await run_job(jobs, user_id, big)
            print("bare SQL merge: all updates, plain and guarded ...", file=sys.stderr)
            results["bare_update_s"] = await bare_merge_s(pg, user_id)
            results["bare_guarded_s"] = await bare_merge_s(pg, user_id, guarded=True)
            await _truncate(pg)
            print("job: small file into an empty table ...", file=sys.stderr)
            results["job_small"] = await run_job(jobs, user_id, small)
        await drop_bare_staging(pg)
        await _truncate(pg)
        print("naive ORM ...", file=sys.stderr)
        results["orm"] = await naive_orm(settings, user_id, big, args.orm_rows)
        await _truncate(pg)
        print("merge variants ...", file=sys.stderr)
        results["variants"] = await merge_variants(pg, user_id, small, args.batch_rows)
    finally:
        await pg.close()
        await _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await _clean_redis()
        await asyncio.to_thread(shutil.rmtree, work)
    print_table(results, args)


def print_table(r: dict[str, Any], args: argparse.Namespace) -> None:
    rows = args.rows
    again, small, orm = r["job_again"], r["job_small"], r["orm"]
    pairs: list[tuple[float, dict[str, Any]]] = r["pairs"]
    bare_new = rows / statistics.median(bare_s for bare_s, _ in pairs)
    job_new = rows / statistics.median(job["job_s"] for _, job in pairs)
    ratios = [bare_s / job["job_s"] for bare_s, job in pairs]
    worst = {
        "rss_mb": max(job["rss_mb"] for _, job in pairs),
        "job_block_ms": max(job["job_block_ms"] for _, job in pairs),
        "block_ms": max(job["block_ms"] for _, job in pairs),
    }
    bare_upd = rows / r["bare_update_s"]
    staged = rows / (r["copy_s"] + statistics.median(bare_s for bare_s, _ in pairs))
    guarded = rows / r["bare_guarded_s"]
    job_again = rows / again["job_s"]
    orm_rate = orm["rows"] / orm["seconds"]
    each = ", ".join(f"{ratio:.2f}x" for ratio in ratios)
    table = [
        ("bare SQL merge, empty table (merge only; median)", bare_new, 1.0, None),
        ("bare SQL: parse+validate+COPY, then merge", staged, staged / bare_new, None),
        (f"**job**, empty table (incl. counting pass; median; pairs: {each})", job_new,
         statistics.median(ratios), worst),
        ("bare SQL merge, all updates (plain DO UPDATE)", bare_upd, 1.0, None),
        ("bare SQL merge, all updates, job's no-op guard", guarded, guarded / bare_upd, None),
        ("**job**, re-import over existing contacts", job_again, job_again / bare_upd, again),
        (f"**job**, {args.small_rows:,} rows, empty table", args.small_rows / small["job_s"],
         None, small),
        (f"naive ORM, add per row, commit per 1,000 ({orm['rows']:,} rows)", orm_rate,
         orm_rate / bare_new, None),
    ]  # fmt: skip
    print(
        f"\n{rows:,} rows (10 columns, ~2% invalid, ~1% repeated emails), batches of "
        f"{args.batch_rows:,}; rows/s = data rows of the file / seconds\n"
    )
    print("| case | rows/s | vs bare merge | peak RSS MB | max loop block ms (in job / all) |")
    print("|---|---|---|---|---|")
    for name, rate, ratio, job in table:
        shown = f"{ratio:.2f}x" if ratio is not None else ""
        extra = (
            f"{job['rss_mb']:.0f} | {job['job_block_ms']:.0f} / {job['block_ms']:.0f}"
            if job
            else " | "
        )
        print(f"| {name} | {rate:,.0f} | {shown} | {extra} |")
    v = r["variants"]
    counts = [job["counts"] for _, job in pairs]
    print(
        f"\njob counts (created, updated, errors): first runs {counts}, re-import "
        f"{again['counts']}.\nMerge of {args.small_rows:,} rows in "
        f"{args.batch_rows:,}-row batches, database time: duplicates collapsed in Python "
        f"{v['python_s']:.2f} s (+ {v['prepare_s']:.2f} s of Python, overlapped in the job), "
        f"collapsed in SQL with array_agg {v['sql_s']:.2f} s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--orm-rows", type=int, default=50_000)
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_child:
        run_worker_child()
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

"""What DATABASE_POOLER=pgbouncer costs an import: the same job straight to PostgreSQL and
through PgBouncer in transaction mode (`make bench-import-pooler`).

    python bench/bench_import_pooler.py [--rows 200000] [--batch-rows 5000] [--pairs 3]

Each pair imports the same file into an empty table twice, in a real worker process
(`bench_import.run_job`): once with DATABASE_URL at PostgreSQL and the statement caches on,
once at a PgBouncer of its own (`bench/pgbouncer.py`, pool of 20 server connections) with
DATABASE_POOLER=pgbouncer. Pairs interleave because this machine's speed drifts by minutes.
Uses a database of its own (`c360_bench_import_pooler`, dropped at the end) on
BENCH_PG_SERVER, and BENCH_REDIS_URL (default db 10; its import keys are removed again).
Prints a markdown table; timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import make_contacts_csv
from bench.bench_import import _clean_redis, _truncate, run_job
from bench.pgbouncer import pgbouncer
from db.migrate import upgrade
from worker.client import JobsClient
from worker.import_source import user_import_dir
from worker.settings import Settings

PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
DATABASE = "c360_bench_import_pooler"
POOL_SIZE = 20


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="c360-bench-pooler-"))
    direct = Settings(
        database_url=f"{PG_SERVER}/{DATABASE}",
        redis_url=REDIS_URL,
        import_dir=work / "imports",
        import_batch_rows=args.batch_rows,
    )
    user_id = uuid.uuid4()
    home = user_import_dir(direct, user_id)
    home.mkdir(parents=True)
    source = home / "contacts.csv"
    make_contacts_csv.main([str(source), "--rows", str(args.rows)])
    await _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await upgrade(direct.database)
    pg = await asyncpg.connect(f"{PG_SERVER}/{DATABASE}")
    results: list[dict[str, dict[str, Any]]] = []
    try:
        await pg.execute("INSERT INTO users (id, email) VALUES ($1, 'bench@x.io')", user_id)
        with pgbouncer(pg_port=direct.database.port or 5432, pool_size=POOL_SIZE) as bouncer:
            pooled = direct.model_copy(
                update={
                    "database_url": direct.database.set(port=bouncer.port).render_as_string(
                        hide_password=False
                    ),
                    "database_pooler": "pgbouncer",
                }
            )
            for pair in range(1, args.pairs + 1):
                runs: dict[str, dict[str, Any]] = {}
                for name, settings in (("direct", direct), ("pgbouncer", pooled)):
                    print(f"pair {pair}: {name} ...", file=sys.stderr)
                    await _truncate(pg)
                    async with JobsClient.from_settings(settings) as jobs:
                        runs[name] = await run_job(jobs, user_id, source)
                results.append(runs)
    finally:
        await pg.close()
        await _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await _clean_redis()
        await asyncio.to_thread(shutil.rmtree, work)
    print_table(results, args)


def print_table(results: list[dict[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.rows:,} rows, batches of {args.batch_rows:,}, into an empty table; "
        f"PgBouncer 1.18 in transaction mode, pool of {POOL_SIZE}; medians of {args.pairs} "
        "interleaved pairs\n"
    )
    print("| path | rows/s (median) | each pair | peak RSS MB |")
    print("|---|---|---|---|")
    medians = {}
    for name in ("direct", "pgbouncer"):
        rates = [args.rows / runs[name]["job_s"] for runs in results]
        medians[name] = statistics.median(rates)
        each = ", ".join(f"{rate:,.0f}" for rate in rates)
        rss = max(runs[name]["rss_mb"] for runs in results)
        print(f"| {name} | {medians[name]:,.0f} | {each} | {rss:.0f} |")
    ratios = [runs["direct"]["job_s"] / runs["pgbouncer"]["job_s"] for runs in results]
    print(
        f"\nthrough PgBouncer: {statistics.median(ratios):.2f}x the direct rate, median "
        f"(pairs: {', '.join(f'{r:.2f}x' for r in ratios)})"
    )
    counts = {runs[name]["counts"] for runs in results for name in runs}
    print(f"counts (created, updated, errors) of every run: {sorted(counts)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=3)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

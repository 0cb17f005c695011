"""Export speed and worker memory: 1,000,000 contacts, side by side with a bare COPY.

    make bench-export        # or: .venv/bin/python bench/bench_export.py [--rows 1000000]

Creates its own database (`c360_bench_export`, dropped at the end), fills it with
`generate_series` (one user with --rows contacts, one with --small-rows), then measures in one run:

- bare COPY: `COPY (SELECT <the same 13 columns, same join>) TO STDOUT WITH CSV` through asyncpg
  to a local file, no neutralisation: the floor the issue compares against;
- the same COPY sorted by created_at (why the export has no ORDER BY), and the export's exact
  query (csv_safe() on every text cell) into `LocalStorage`, both in this process;
- the export job in a real worker process (`python -m worker work exports --burst`), local
  storage and S3 (moto's server on loopback, default 5 MiB parts): rows/s from the export row's
  own started_at/finished_at, and the worker's peak RSS (VmHWM, polled) for both row counts.

Redis: REDIS_URL (default db 14, the export tests' own); the keys the bench adds are removed.
Timings are medians of --repeat runs; absolute figures drift on a shared machine, ratios hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import redis.asyncio as aioredis
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from db.migrate import upgrade  # noqa: E402
from jobs.exports.query import contacts_query  # noqa: E402
from tests.support.s3_server import FAKE_CREDENTIALS, S3TestServer, fake_aws_credentials  # noqa: E402
from worker.client import JobsClient  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.storage import LocalStorage, export_key  # noqa: E402

DATABASE = "c360_bench_export"
PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
BIG_USER = "00000000-0000-4000-8000-000000000001"
SMALL_USER = "00000000-0000-4000-8000-000000000002"

# Contact-shaped rows: ASCII mostly, some accents, a formula every 100th job title, a comma in
# every company name (quoted cells), 80% of contacts linked to one of 500 companies.
FILL_SQL = """
INSERT INTO users (id, email) VALUES ($1, 'big@bench.test'), ($2, 'small@bench.test');
INSERT INTO companies (user_id, name, domain)
SELECT u, 'Company ' || i || ', Inc.', 'c' || i || '.test'
FROM unnest(ARRAY[$1, $2]::uuid[]) AS u, generate_series(1, 500) AS i;
"""
CONTACTS_SQL = """
INSERT INTO contacts (user_id, email, first_name, last_name, phone, company_id, job_title,
                      city, country, linkedin_url, tags, created_at, updated_at)
SELECT $1::uuid, 'user' || i || '@example.com',
       CASE WHEN i % 10 = 0 THEN 'Émile' ELSE 'John' END,
       CASE WHEN i % 7 = 0 THEN 'Øster' ELSE 'Smith' || i END,
       '+1 (555) 010-' || lpad((i % 10000)::text, 4, '0'),
       CASE WHEN i % 5 = 0 THEN NULL ELSE co.ids[1 + i % 500] END,
       CASE WHEN i % 100 = 0 THEN '=HYPERLINK("http://evil.test")' ELSE 'Engineer' END,
       CASE WHEN i % 5 = 0 THEN 'Zürich' ELSE 'Berlin' END, 'DE',
       'https://www.linkedin.com/in/u' || i, ARRAY['vip', 'lead' || (i % 3)],
       timestamptz '2026-01-01' + i * interval '1 second', timestamptz '2026-06-01'
FROM generate_series(1, $2::int) AS i,
     (SELECT array_agg(id ORDER BY name) AS ids FROM companies WHERE user_id = $1::uuid) AS co
"""
BARE_COLUMNS = (
    "c.id::text, c.email, c.first_name, c.last_name, c.phone, co.name, c.job_title, c.city, "
    "c.country, c.linkedin_url, array_to_string(c.tags, ';'), "
    """to_char(c.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), """
    """to_char(c.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""
)
BARE_SQL = (
    f"SELECT {BARE_COLUMNS} FROM contacts c "
    "LEFT JOIN companies co ON co.id = c.company_id AND co.user_id = $1 WHERE c.user_id = $1"
)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fill(conn: asyncpg.Connection, rows: int, small_rows: int) -> float:
    started = time.perf_counter()
    await conn.execute("SET synchronous_commit = off")
    await conn.execute(FILL_SQL.replace("$1", f"'{BIG_USER}'").replace("$2", f"'{SMALL_USER}'"))
    await conn.execute(CONTACTS_SQL, BIG_USER, rows)
    await conn.execute(CONTACTS_SQL, SMALL_USER, small_rows)
    await conn.execute("VACUUM ANALYZE contacts")
    await conn.execute("VACUUM ANALYZE companies")
    return time.perf_counter() - started


async def timed_copy(conn: asyncpg.Connection, query: str, path: Path) -> tuple[float, int]:
    started = time.perf_counter()
    status = await conn.copy_from_query(query, BIG_USER, output=str(path), format="csv")
    elapsed = time.perf_counter() - started
    return elapsed, int(status.split()[1])


async def timed_storage_copy(conn: asyncpg.Connection, root: Path) -> tuple[float, int, int]:
    storage = LocalStorage(root)
    started = time.perf_counter()
    async with storage.writer(export_key(BIG_USER, BIG_USER)) as out:
        status = await conn.copy_from_query(
            contacts_query(has_selection=False),
            BIG_USER,
            output=out.write,
            format="csv",
            header=True,
        )
    return time.perf_counter() - started, int(status.split()[1]), out.bytes_written


def peak_rss_bytes(pid: int) -> int:
    """The process's high-water RSS so far (Linux VmHWM), or its current RSS elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(psutil.Process(pid).memory_info().rss)


async def worker_export(jobs: JobsClient, env: dict[str, str], user: str) -> dict[str, Any]:
    """Enqueue one contacts export, run a burst worker process for it, return its figures."""
    status = await jobs.export_contacts(user)
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "work", "exports", "--burst", cwd=ROOT, env=env
    )
    peak = 0
    while worker.returncode is None:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            peak = max(peak, peak_rss_bytes(worker.pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.wait(), 0.01)
    async with jobs.sessions() as session:
        row = (
            await session.execute(
                text(
                    "SELECT status, row_count, error, extract(epoch FROM finished_at - started_at)"
                    " FROM exports WHERE id = :id"
                ),
                {"id": status.id},
            )
        ).one()
    if row[0] != "completed":
        raise SystemExit(f"export failed: {row[2]}")
    return {"rows": row[1], "seconds": float(row[3]), "peak_rss": peak}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bench_started = time.perf_counter()

    redis = aioredis.Redis.from_url(REDIS_URL)
    keys_before = {k async for k in redis.scan_iter(count=1000)}
    await admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    settings = Settings(database_url=f"{PG_SERVER}/{DATABASE}", redis_url=REDIS_URL)
    s3_server = None
    try:
        await upgrade(settings.database)
        conn = await asyncpg.connect(f"{PG_SERVER}/{DATABASE}")
        fill_s = await fill(conn, args.rows, args.small_rows)
        print(f"filled {args.rows + args.small_rows:,} contacts in {fill_s:.1f} s", flush=True)
        results: dict[str, dict[str, Any]] = {}

        with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
            tmp_dir = Path(tmp)
            # In-process: the floor, the sort, and the export's query into LocalStorage. One
            # untimed pass warms the cache; then the cases take turns, so a noisy neighbour
            # slows all of them rather than one.
            ordered = BARE_SQL + " ORDER BY c.created_at, c.id"
            await timed_copy(conn, BARE_SQL, tmp_dir / "warm.csv")
            bare_name, sorted_name = "bare COPY", "bare COPY + ORDER BY created_at, id (not used)"
            export_name = "export query (csv_safe() x10) -> LocalStorage, in-process"
            runs: dict[str, list[tuple[float, int, int]]] = {}
            for _ in range(args.repeat):
                for name, query in ((bare_name, BARE_SQL), (sorted_name, ordered)):
                    elapsed, rows = await timed_copy(conn, query, tmp_dir / "bare.csv")
                    size = (tmp_dir / "bare.csv").stat().st_size
                    runs.setdefault(name, []).append((elapsed, rows, size))
                runs.setdefault(export_name, []).append(
                    await timed_storage_copy(conn, tmp_dir / "s")
                )
            for name, timings in runs.items():
                results[name] = {
                    "rows": timings[0][1],
                    "seconds": statistics.median(t[0] for t in timings),
                    "bytes": timings[0][2],
                }
            await conn.close()
            export_bytes = results[export_name]["bytes"]

            # The job in a worker process, local storage then S3.
            base_env = {
                k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "S3_"))
            }
            base_env.update(
                DATABASE_URL=settings.database_url,
                REDIS_URL=REDIS_URL,
                EXPORT_DIR=str(tmp_dir / "exports"),
                LOG_LEVEL="WARNING",
            )
            with fake_aws_credentials():
                s3_server = S3TestServer()
                s3_server.start()
                s3_server.create_bucket("bench-exports")
            s3_env = {
                **base_env,
                **FAKE_CREDENTIALS,
                "STORAGE_BACKEND": "s3",
                "S3_BUCKET": "bench-exports",
                "S3_ENDPOINT_URL": s3_server.endpoint_url,
                "S3_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            }
            async with JobsClient.from_settings(settings) as jobs:
                for label, env in (
                    ("local", {**base_env, "STORAGE_BACKEND": "local"}),
                    ("S3", s3_env),
                ):
                    small = await worker_export(jobs, env, SMALL_USER)
                    big_runs = [
                        await worker_export(jobs, env, BIG_USER) for _ in range(args.repeat)
                    ]
                    big = {
                        "rows": big_runs[0]["rows"],
                        "seconds": statistics.median(r["seconds"] for r in big_runs),
                        "bytes": export_bytes,
                        "peak_rss": max(r["peak_rss"] for r in big_runs),
                        "peak_rss_small": small["peak_rss"],
                    }
                    results[f"export job, worker process, {label} storage"] = big
                    print(f"{label}: done", flush=True)

        base = results["bare COPY"]
        print(
            f"\n{args.rows:,} contacts (13 columns, ~{mib(export_bytes):.0f} MiB of CSV), "
            f"median of {args.repeat}; bench took {time.perf_counter() - bench_started:.0f} s\n"
        )
        print(
            "| run | rows/s | MiB/s | vs bare COPY | worker peak RSS, "
            f"{args.small_rows // 1000}k / {args.rows // 1000}k rows |"
        )
        print("|---|---:|---:|---:|---|")
        for name, r in results.items():
            rate = r["rows"] / r["seconds"]
            rss = (
                f"{r['peak_rss_small'] / 1e6:.0f} MB / {r['peak_rss'] / 1e6:.0f} MB"
                if "peak_rss" in r
                else "-"
            )
            ratio = rate / (base["rows"] / base["seconds"])
            print(
                f"| {name} | {rate:,.0f} | {mib(r['bytes']) / r['seconds']:.0f} | "
                f"{ratio:.2f}x | {rss} |"
            )
    finally:
        if s3_server is not None:
            s3_server.stop()
        await admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        added = [k async for k in redis.scan_iter(count=1000) if k not in keys_before]
        if added:
            await redis.delete(*added)
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())

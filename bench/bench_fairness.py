"""Fair sharing: how long user B's small import waits behind user A's burst (`make bench-fairness`).

    python bench/bench_fairness.py [--rows 100000] [--a-imports 10] [--b-rows 1000]

A real imports worker process (`python -m worker work imports`: 2 slots) is running; user A
enqueues `--a-imports` imports of `--rows` rows each, then user B one of `--b-rows` rows. Run
twice: with the cap (`IMPORT_MAX_RUNNING_PER_USER=1`, the default) and without it (a cap above
A's burst). Reports B's enqueue-to-completed time (its row's `finished_at - created_at`) and
how long A's whole burst took (first `created_at` to last `finished_at`), and how many tries
failed and were retried.

Uses a database of its own (`c360_bench_fairness`, dropped at the end) on BENCH_PG_SERVER and
Redis db BENCH_REDIS_DB (default 13; it must be empty or the test rig's, and is flushed).
BENCH_LOG_LEVEL=INFO shows the worker's log. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
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
from db.migrate import upgrade
from worker.client import JobsClient
from worker.import_source import user_import_dir
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "13"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
DATABASE = "c360_bench_fairness"
TIMEOUT_S = 1800
# The test rig's marker (tests/conftest.py): such a database holds only test leftovers.
TEST_RIG_MARKER = b"c360:test-rig-owns-this-db"


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def _wait(what: str, check: Any, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := await check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
    return found


async def scenario(
    settings: Settings, pg: asyncpg.Connection, files: dict[str, Path], args: argparse.Namespace
) -> dict[str, float]:
    """One run: a worker with the cap `settings` gives, A's burst, then B's small import."""
    await pg.execute("TRUNCATE users, contacts, companies, contact_import_jobs CASCADE")
    redis = aioredis.Redis.from_url(REDIS_URL)
    await redis.flushdb()
    a, b = uuid.uuid4(), uuid.uuid4()
    for user in (a, b):
        await pg.execute("INSERT INTO users (id, email) VALUES ($1, $2)", user, f"{user}@x.io")
        user_import_dir(settings, user).mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        shutil.copyfile(path, user_import_dir(settings, b if name == "b" else a) / path.name)
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": REDIS_URL,
        "IMPORT_DIR": str(settings.import_dir),
        "IMPORT_MAX_RUNNING_PER_USER": str(settings.import_max_running_per_user),
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        "PYTHONPATH": str(ROOT),
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "work", "imports", env=env, cwd=ROOT
    )
    try:

        async def ready() -> bool:
            return bool([k async for k in redis.scan_iter(match="imports:health-check:*")])

        await _wait("the worker's first heartbeat", ready, 60)
        async with JobsClient.from_settings(settings) as jobs:
            a_ids = [(await jobs.import_contacts(a, f"a{n}.csv")).id for n in range(args.a_imports)]
            b_id = (await jobs.import_contacts(b, "b.csv")).id

        async def all_done() -> bool:
            left = await pg.fetchval(
                "SELECT count(*) FROM contact_import_jobs WHERE status <> 'completed'"
            )
            return int(left) == 0

        await _wait("every import to complete", all_done)
        # Tries that failed and were retried (our stats leave parked tries out): two imports
        # of one user at once can deadlock on the same companies and contacts.
        retried = int(await redis.hget("c360:stats:imports", "retried") or 0)
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.wait(), 60)
        await redis.flushdb()
        await redis.aclose()
    b_s = await pg.fetchval(
        "SELECT extract(epoch FROM finished_at - created_at) FROM contact_import_jobs"
        " WHERE id = $1",
        b_id,
    )
    a_s = await pg.fetchval(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM contact_import_jobs"
        " WHERE id = ANY($1)",
        a_ids,
    )
    # How many of A's imports had completed when B's did: B's place in the line.
    a_before_b = await pg.fetchval(
        "SELECT count(*) FROM contact_import_jobs WHERE id = ANY($1) AND finished_at <"
        " (SELECT finished_at FROM contact_import_jobs WHERE id = $2)",
        a_ids,
        b_id,
    )
    return {
        "b_s": float(b_s),
        "a_s": float(a_s),
        "a_before_b": int(a_before_b),
        "retried": retried,
    }


async def main_async(args: argparse.Namespace) -> None:
    probe = aioredis.Redis.from_url(REDIS_URL)
    try:
        # Empty, or the test rig's (it flushes such a database itself before every test).
        if await probe.dbsize() and not await probe.exists(TEST_RIG_MARKER):
            sys.exit(f"Redis db {REDIS_DB} is not empty; set BENCH_REDIS_DB to a free one")
    finally:
        await probe.aclose()
    work = Path(tempfile.mkdtemp(prefix="c360-bench-fairness-"))
    # A's uploads are different files (their own seeds), as a customer's would be.
    files = {f"a{n}": work / f"a{n}.csv" for n in range(args.a_imports)} | {"b": work / "b.csv"}
    for seed, (name, path) in enumerate(files.items(), start=1):
        rows = args.b_rows if name == "b" else args.rows
        make_contacts_csv.main([str(path), "--rows", str(rows), "--seed", str(seed)])
    settings = Settings(
        database_url=f"{PG_SERVER}/{DATABASE}", redis_url=REDIS_URL, import_dir=work / "imports"
    )
    await _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await upgrade(settings.database)
    pg = await asyncpg.connect(f"{PG_SERVER}/{DATABASE}")
    results = {}
    try:
        for name, cap in (("with the cap (1 per user)", 1), ("without (cap above A's burst)", 0)):
            capped = settings.model_copy(
                update={"import_max_running_per_user": cap or args.a_imports + 1}
            )
            print(f"{name} ...", file=sys.stderr)
            results[name] = await scenario(capped, pg, files, args)
    finally:
        await pg.close()
        await _admin(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await asyncio.to_thread(shutil.rmtree, work)
    print(
        f"\nA: {args.a_imports} imports of {args.rows:,} rows, then B: 1 of {args.b_rows:,} rows;"
        " one imports worker (2 slots)\n"
    )
    print(
        "| run | B enqueue to completed s | A's imports done before B's | A's burst s"
        " | tries retried |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['b_s']:.1f} | {r['a_before_b']} | {r['a_s']:.1f} | {r['retried']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each of A's imports")
    parser.add_argument("--a-imports", type=int, default=10)
    parser.add_argument("--b-rows", type=int, default=1_000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

"""Test-only jobs for the fault tests, loaded by real worker processes via `C360_JOB_MODULES`.

They record every start in `rel_runs` (committed before the work, so a killed try still shows)
and their one effect in `rel_done`, whose unique key makes them idempotent: a re-run after a
crash adds a run, never a second effect. Tables live only in the test database (`FIXTURE_DDL`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from sqlalchemy import text

from worker.context import Ctx
from worker.job import job

FIXTURE_DDL = (
    "CREATE TABLE IF NOT EXISTS rel_runs (key text NOT NULL, try int NOT NULL, pid int NOT NULL,"
    " started_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE IF NOT EXISTS rel_done (key text PRIMARY KEY, pid int NOT NULL,"
    " done_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    "CREATE TABLE IF NOT EXISTS rel_failures (key text NOT NULL, message text NOT NULL)",
)
FIXTURE_TABLES = "rel_runs, rel_done, rel_failures"
# Memory a `hog_memory` job keeps: held until the process exits, like a leak would be.
_hoard: list[bytes] = []


async def _record_run(ctx: Ctx, key: str) -> int:
    """Record this run; the number of earlier runs of `key`."""
    async with ctx["sessions"].begin() as session:
        earlier = await session.scalar(
            text("SELECT count(*) FROM rel_runs WHERE key = :key"), {"key": key}
        )
        await session.execute(
            text("INSERT INTO rel_runs (key, try, pid) VALUES (:key, :try, :pid)"),
            {"key": key, "try": ctx.get("job_try", 1), "pid": os.getpid()},
        )
    return int(earlier or 0)


async def _record_done(ctx: Ctx, key: str) -> None:
    async with ctx["sessions"].begin() as session:
        await session.execute(
            text("INSERT INTO rel_done (key, pid) VALUES (:key, :pid) ON CONFLICT DO NOTHING"),
            {"key": key, "pid": os.getpid()},
        )


@job()
async def record(ctx: Ctx, key: str, sleep_s: float = 0.0, first_run_sleep_s: float = 0.0) -> int:
    """Record a run, sleep (longer on the first run: the one a test interrupts), record done."""
    earlier = await _record_run(ctx, key)
    await asyncio.sleep(first_run_sleep_s if earlier == 0 else sleep_s)
    await _record_done(ctx, key)
    return os.getpid()


async def _record_failure(ctx: Ctx, kwargs: dict[str, Any], message: str) -> None:
    async with ctx["sessions"].begin() as session:
        await session.execute(
            text("INSERT INTO rel_failures (key, message) VALUES (:key, :message)"),
            {"key": kwargs["key"], "message": message},
        )


@job(on_failure=_record_failure)
async def kill_own_worker(ctx: Ctx, key: str) -> None:
    """A poison pill: SIGKILLs the worker process running it, on every try."""
    await _record_run(ctx, key)
    os.kill(os.getpid(), signal.SIGKILL)


@job()
async def hog_memory(ctx: Ctx, key: str, mb: int) -> int:
    """Keep `mb` MiB resident (written, so the pages are really allocated)."""
    await _record_run(ctx, key)
    _hoard.append(b"\x01" * (mb * 1024 * 1024))
    await _record_done(ctx, key)
    return os.getpid()


@job()
async def grow_memory(ctx: Ctx, key: str, mb: int, hold_s: float) -> int:
    """First run: after a second, grow by `mb` MiB in 20 MiB steps, then hold it `hold_s` (a
    runaway job); a later run only records done."""
    if await _record_run(ctx, key) == 0:
        await asyncio.sleep(1.0)
        for _ in range(mb // 20):
            _hoard.append(b"\x01" * (20 * 1024 * 1024))
            await asyncio.sleep(0.1)
        await asyncio.sleep(hold_s)
    await _record_done(ctx, key)
    return os.getpid()


@job()
async def db_hold(ctx: Ctx, key: str, hold_s: float) -> None:
    """Write inside a transaction held open for `hold_s`, so a test can terminate it mid-way."""
    await _record_run(ctx, key)
    async with ctx["sessions"].begin() as session:
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": hold_s})
        await session.execute(
            text("INSERT INTO rel_done (key, pid) VALUES (:key, :pid) ON CONFLICT DO NOTHING"),
            {"key": key, "pid": os.getpid()},
        )


JOBS = [record, kill_own_worker, hog_memory, grow_memory, db_hold]

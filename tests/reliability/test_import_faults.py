"""Fault tests on the real import job: a 200,000-row file through real worker processes.

Each test breaks something half-way through the import (SIGKILL, SIGTERM past the grace, a Redis
restart, terminated PostgreSQL connections, a Redis flush) and checks that the import ends with
exactly what one uninterrupted run of the same file gives: the same counters, and the same
contacts, companies and stored row errors, compared as digests of their ordered rows.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, retry_key_prefix
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bench.make_contacts_csv import main as make_contacts_csv
from tests.conftest import REDIS_OWNER_KEY, RunBurst
from tests.reliability.conftest import (
    Db,
    PrivateRedis,
    Processes,
    wait_for,
    worker_env,
    worker_ready,
)
from tests.support.redis_replies import reply
from tests.support.users import new_user
from worker.client import JobsClient
from worker.import_source import user_import_dir
from worker.lease import running_key
from worker.main import QUEUE_CONFIGS
from worker.reconcile import reconcile_jobs
from worker.serialization import deserialize, serialize
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

ROWS = 200_000
BATCH_ROWS = 5_000
HALF = ROWS // 2
FILE_NAME = "contacts-200k.csv"
Sessions = async_sessionmaker[AsyncSession]


def import_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """A worker of the real imports queue, reading IMPORT_DIR, in batches of BATCH_ROWS."""
    return worker_env(
        settings,
        c360_job_modules="jobs.imports",
        import_dir=settings.import_dir,
        import_batch_rows=BATCH_ROWS,
        **overrides,
    )


# ---- what an import left behind -----------------------------------------------------------------

_SNAPSHOT_SQL = {
    "contacts": (
        "SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY t::text)) FROM ("
        " SELECT c.email, c.first_name, c.last_name, c.phone, co.name, c.job_title, c.city,"
        " c.country, c.linkedin_url, c.tags FROM contacts c"
        " LEFT JOIN companies co ON co.id = c.company_id WHERE c.user_id = :u) AS t"
    ),
    "companies": (
        "SELECT count(*), md5(string_agg(name, E'\\n' ORDER BY name)) FROM companies"
        " WHERE user_id = :u"
    ),
    "errors": (
        "SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY t.row_number)) FROM ("
        " SELECT e.row_number, e.message, e.payload FROM contact_import_errors e"
        " JOIN contact_import_jobs j ON j.id = e.job_id WHERE j.user_id = :u) AS t"
    ),
    "import": (
        "SELECT status, total_rows, processed_rows, created_count, updated_count, error_count"
        " FROM contact_import_jobs WHERE user_id = :u"
    ),
}


async def snapshot(sessions: Sessions, user: uuid.UUID) -> dict[str, tuple[Any, ...]]:
    """Counters of the user's import, and (count, md5) of its contacts, companies, errors."""
    found = {}
    async with sessions() as session:
        for name, sql in _SNAPSHOT_SQL.items():
            found[name] = tuple((await session.execute(text(sql), {"u": user})).one())
    return found


async def import_row(db: Db, import_id: uuid.UUID) -> tuple[str, int]:
    (row,) = await db.rows(
        "SELECT status, processed_rows FROM contact_import_jobs WHERE id = :id", id=import_id
    )
    return row[0], row[1]


def past(db: Db, import_id: uuid.UUID, rows: int) -> Any:
    async def check() -> bool:
        status, processed = await import_row(db, import_id)
        return status == "processing" and processed >= rows

    return check


def completed(db: Db, import_id: uuid.UUID) -> Any:
    async def check() -> bool:
        return (await import_row(db, import_id))[0] == "completed"

    return check


def backend_ports(pid: int) -> set[int]:
    """Local ports of the PostgreSQL connections of process `pid` and its children."""
    process = psutil.Process(pid)
    ports = set()
    for each in (process, *process.children(recursive=True)):
        for conn in each.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == 5432:
                ports.add(conn.laddr.port)
    return ports


async def backends_gone(db: Db, settings: Settings, ports: set[int]) -> bool:
    """True once PostgreSQL has no backend left for those client ports (their session ended)."""
    left = await db.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND client_port = ANY(:ports)",
        db=settings.database.database,
        ports=list(ports),
    )
    return int(left) == 0


async def runner_pid(redis: aioredis.Redis, arq_id: str) -> int:
    """The pid of the worker holding the job's lease (from the `status` mirror), or 0."""
    entry = await reply(redis.hget(running_key("imports"), arq_id))
    return int(json.loads(entry)["worker"].rsplit(":", 1)[1]) if entry else 0


# ---- the reference: one uninterrupted run of the same file, once per module ---------------------


@dataclass(frozen=True)
class Reference:
    file: Path  # the generated file, outside IMPORT_DIR: `place` it for each importing user
    snapshot: dict[str, tuple[Any, ...]]
    seconds: float


def place(settings: Settings, source: Path, user: uuid.UUID) -> str:
    """A copy of `source` in the user's own directory, the only place the worker reads for
    them (IMPORT_DIR/<user_id>/)."""
    home = user_import_dir(settings, user)
    home.mkdir(exist_ok=True)
    target = home / source.name
    shutil.copyfile(source, target)
    return str(target)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / FILE_NAME
    make_contacts_csv([str(path), "--rows", str(ROWS), "--seed", "6"])
    return path


@pytest.fixture(scope="module")
async def reference(
    settings: Settings,
    sessions: Sessions,
    redis_raw: aioredis.Redis,
    csv_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Reference]:
    await redis_raw.flushdb()  # the rig owns this database (checked by `redis_raw`)
    await redis_raw.set(REDIS_OWNER_KEY, "1")
    user = await new_user(sessions)
    pool = await create_pool(
        RedisSettings.from_dsn(settings.redis_url),
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    procs = Processes(tmp_path_factory.mktemp("reference"))
    try:
        client = JobsClient(redis=pool, sessions=sessions, settings=settings)
        await client.import_contacts(user, place(settings, csv_file, user))
        started = time.monotonic()
        burst = procs.start("work", "imports", "--burst", env=import_env(settings))
        assert await procs.wait_exit(burst, 80) == 0, procs.log(burst)
        seconds = time.monotonic() - started
        found = await snapshot(sessions, user)
    finally:
        procs.kill_all()
        await pool.aclose()
    status, total, processed, created, updated, errors = found["import"]
    # The generator's file: every row counted once, ~2% invalid, ~1% repeated emails.
    assert (status, total, processed) == ("completed", ROWS, ROWS)
    assert created + updated + errors == ROWS
    assert 0.01 * ROWS < errors < 0.03 * ROWS and 0 < updated < 0.02 * ROWS
    assert found["contacts"][0] == created
    yield Reference(csv_file, found, seconds)


@pytest.fixture
def client(arq_redis: ArqRedis, sessions: Sessions, settings: Settings) -> JobsClient:
    return JobsClient(redis=arq_redis, sessions=sessions, settings=settings)


# ---- the tests ----------------------------------------------------------------------------------


async def test_sigkill_half_way_resumes_on_another_worker_within_30_s_and_ends_exact(
    settings: Settings,
    processes: Processes,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    client: JobsClient,
    db: Db,
    reference: Reference,
) -> None:
    env = import_env(settings)
    workers = {p.pid: p for p in (processes.start("work", "imports", env=env) for _ in range(2))}
    for pid in workers:
        await wait_for(functools.partial(worker_ready, redis_raw, "imports", pid), 20, "workers")
    user = await new_user(sessions)
    import_id = (await client.import_contacts(user, place(settings, reference.file, user))).id
    await wait_for(past(db, import_id, HALF), 60, "half of the import", every_s=0.02)

    victim = await runner_pid(redis_raw, f"import:{import_id}")
    (survivor,) = set(workers) - {victim}
    ports = backend_ports(victim)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    # Once PostgreSQL has ended the dead worker's sessions, nothing of it can commit any more.
    await wait_for(lambda: backends_gone(db, settings, ports), 10, "the dead sessions to end")
    status, checkpoint = await import_row(db, import_id)
    assert status == "processing" and HALF <= checkpoint < ROWS
    assert checkpoint % BATCH_ROWS == 0  # whole batches only: the one in flight rolled back

    async def resumed() -> bool:
        return (await import_row(db, import_id))[1] > checkpoint

    await wait_for(resumed, 30, "a batch committed by the other worker", every_s=0.05)
    resumed_s = time.monotonic() - killed_at
    assert resumed_s < 30
    assert await runner_pid(redis_raw, f"import:{import_id}") in (survivor, 0)  # 0: finished
    await wait_for(completed(db, import_id), 60, "the import to complete")
    assert await snapshot(sessions, user) == reference.snapshot
    print(f"\nSIGKILL at row {checkpoint}: resumed after {resumed_s:.1f} s")


async def test_sigterm_drains_then_cancels_requeues_and_the_next_pickup_resumes_exact(
    settings: Settings,
    processes: Processes,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    engine: AsyncEngine,
    client: JobsClient,
    db: Db,
    reference: Reference,
) -> None:
    env = import_env(settings)
    first = processes.start("work", "imports", env=env)
    user = await new_user(sessions)
    import_id = (await client.import_contacts(user, place(settings, reference.file, user))).id
    arq_id = f"import:{import_id}"
    await wait_for(past(db, import_id, HALF), 60, "half of the import", every_s=0.02)

    # Hold the import's row: its next batch waits on the lock, so the job outlasts the grace
    # (the whole file takes less than the grace here) and the shutdown has to cancel it.
    async with engine.connect() as holder:
        await holder.execute(
            text("SELECT 1 FROM contact_import_jobs WHERE id = :id FOR UPDATE"), {"id": import_id}
        )
        checkpoint = (await import_row(db, import_id))[1]
        first.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        assert await processes.wait_exit(first, QUEUE_CONFIGS["imports"].shutdown_grace_s + 15) == 0
        drained_s = time.monotonic() - stopped_at
        await holder.rollback()
    grace_s = QUEUE_CONFIGS["imports"].shutdown_grace_s
    assert grace_s - 1 < drained_s < grace_s + 15, processes.log(first)
    # Cancelled back to the queue: unclaimed, its try given back, the checkpoint untouched.
    assert await redis_raw.zscore("imports", arq_id) is not None
    assert not await redis_raw.exists(in_progress_key_prefix + arq_id)
    assert await redis_raw.get(retry_key_prefix + arq_id) == b"0"
    assert await import_row(db, import_id) == ("processing", checkpoint)

    second = processes.start("work", "imports", env=env)
    seen: list[int] = []

    async def done_and_monotonic() -> bool:
        status, processed = await import_row(db, import_id)
        seen.append(processed)
        return status == "completed"

    await wait_for(done_and_monotonic, 60, "the import to complete on the next pickup")
    assert seen == sorted(seen) and seen[0] == checkpoint  # resumed, never restarted
    assert await snapshot(sessions, user) == reference.snapshot
    result = deserialize(await redis_raw.get(f"arq:result:{arq_id}"))
    assert (result["s"], result["t"], result["r"]["status"]) == (True, 1, "completed")
    assert second.poll() is None
    print(f"\nSIGTERM at row {checkpoint}: drained {drained_s:.1f} s, then resumed")


async def test_redis_restart_mid_import_finishes_exact(
    settings: Settings,
    processes: Processes,
    private_redis: PrivateRedis,
    sessions: Sessions,
    db: Db,
    reference: Reference,
) -> None:
    env = import_env(settings, redis_url=private_redis.url)
    supervisor = processes.start("run", "--queue", "imports", env=env)
    pool = await create_pool(
        RedisSettings.from_dsn(private_redis.url),
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    try:
        client = JobsClient(redis=pool, sessions=sessions, settings=settings)
        user = await new_user(sessions)
        import_id = (await client.import_contacts(user, place(settings, reference.file, user))).id
        await wait_for(past(db, import_id, HALF), 60, "half of the import", every_s=0.02)
        private_redis.kill()
        restarted_at = time.monotonic()
        await wait_for(
            lambda: _log_has(processes, supervisor, "lost Redis"), 10, "the worker to see it"
        )
        await private_redis.start()  # from its AOF: the queued job and its lease come back
        await wait_for(completed(db, import_id), 75, "the import to complete after the restart")
        print(f"\nRedis restart: completed {time.monotonic() - restarted_at:.1f} s after it")
        assert await snapshot(sessions, user) == reference.snapshot
        assert await pool.zcard("imports") == 0
        assert supervisor.poll() is None
    finally:
        await pool.aclose()


async def _log_has(processes: Processes, process: subprocess.Popen[bytes], line: str) -> bool:
    return line in processes.log(process)


async def test_terminated_postgres_connections_mid_import_retry_and_finish_exact(
    settings: Settings,
    processes: Processes,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    engine: AsyncEngine,
    client: JobsClient,
    db: Db,
    reference: Reference,
) -> None:
    worker = processes.start("work", "imports", env=import_env(settings))
    user = await new_user(sessions)
    import_id = (await client.import_contacts(user, place(settings, reference.file, user))).id
    await wait_for(past(db, import_id, HALF), 60, "half of the import", every_s=0.02)
    ports = backend_ports(worker.pid)
    async with engine.connect() as connection:
        terminated = await connection.scalar(
            text(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :db AND client_port = ANY(:ports)) AS t"
            ),
            {"db": settings.database.database, "ports": list(ports)},
        )
    assert terminated >= 2  # at least the batch parts' connections
    await wait_for(completed(db, import_id), 60, "the import to complete after the terminations")
    assert await snapshot(sessions, user) == reference.snapshot
    result = deserialize(await redis_raw.get(f"arq:result:import:{import_id}"))
    assert result["s"] is True
    # A retry finished it. Its arq try number does not tell: a try that committed a batch before
    # the terminations gives its try back (InterruptedAfterProgress), one that did not counts.
    log = processes.log(worker)
    assert "interrupted after progress, retry in" in log or "transient failure, retry in" in log
    assert worker.poll() is None


async def test_after_a_redis_flush_the_reconciler_reenqueues_and_the_import_finishes_exact(
    settings: Settings,
    processes: Processes,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    client: JobsClient,
    run_burst: RunBurst,
    arq_redis: ArqRedis,
    db: Db,
    reference: Reference,
) -> None:
    env = import_env(settings)
    first = processes.start("work", "imports", env=env)
    user = await new_user(sessions)
    import_id = (await client.import_contacts(user, place(settings, reference.file, user))).id
    await wait_for(past(db, import_id, HALF), 60, "half of the import", every_s=0.02)
    ports = backend_ports(first.pid)
    # The worker dies and Redis loses everything: only PostgreSQL remembers the import.
    os.kill(first.pid, signal.SIGKILL)
    await redis_raw.flushdb()
    await redis_raw.set(REDIS_OWNER_KEY, "1")
    await wait_for(lambda: backends_gone(db, settings, ports), 10, "the dead sessions to end")
    checkpoint = (await import_row(db, import_id))[1]
    # The reconciler leaves rows younger than a minute alone (the client may not have
    # enqueued yet): age this one.
    async with sessions.begin() as session:
        await session.execute(
            text(
                "UPDATE contact_import_jobs SET created_at = now() - interval '2 minutes'"
                " WHERE id = :id"
            ),
            {"id": import_id},
        )
    second = processes.start("work", "imports", env=env)
    await wait_for(lambda: worker_ready(redis_raw, "imports", second.pid), 20, "worker 2")
    assert await import_row(db, import_id) == ("processing", checkpoint)  # nobody knows it

    await arq_redis.enqueue_job("reconcile_jobs", _job_id="reconcile", _queue_name="default")
    await run_burst("default", jobs=[reconcile_jobs])
    outcome = deserialize(await redis_raw.get("arq:result:reconcile"))
    assert outcome["r"] == {"enqueued": 1, "pruned_leases": 0}
    await wait_for(completed(db, import_id), 60, "the re-enqueued import to complete")
    assert await snapshot(sessions, user) == reference.snapshot
    result = deserialize(await redis_raw.get(f"arq:result:import:{import_id}"))
    assert (result["s"], result["t"]) == (True, 1)  # a fresh job under the same id

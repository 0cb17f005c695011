"""A worker SIGKILLed mid-import behind PgBouncer: the import resumes on the other worker and
ends exactly as an uninterrupted run of the same file does.

The killed worker's lease on the job row is left behind (nobody releases it); it expires
within `LEASE_S`, before arq hands the job to the other worker (worker/lease.py), and the
other worker resumes from the last committed batch. PgBouncer rolls the dead client's open
transaction back when it drops its server connection.
"""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.make_contacts_csv import main as make_contacts_csv
from tests.conftest import RunBurst
from tests.reliability.conftest import Processes, wait_for, worker_env, worker_ready
from tests.reliability.test_import_faults import place, runner_pid, snapshot
from worker.client import JobsClient
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

ROWS = 60_000
BATCH_ROWS = 2_000
Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


async def progress(sessions: Sessions, import_id: uuid.UUID) -> tuple[str, int]:
    async with sessions() as session:
        found = await session.execute(
            text("SELECT status, processed_rows FROM contact_import_jobs WHERE id = :id"),
            {"id": import_id},
        )
        status, processed = found.one()
    return status, processed


async def test_sigkill_mid_import_behind_pgbouncer_resumes_and_ends_exact(
    settings: Settings,
    pooled_settings: Settings,
    pooled_client: JobsClient,
    sessions: Sessions,
    redis_raw: aioredis.Redis,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    processes: Processes,
    tmp_path: Path,
) -> None:
    source = tmp_path / "contacts-60k.csv"
    make_contacts_csv([str(source), "--rows", str(ROWS), "--seed", "14"])
    # The reference: one uninterrupted run of the same file, straight to PostgreSQL.
    reference_user = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO users (id, email) VALUES (:id, :email)"),
            {"id": reference_user, "email": f"ref-{reference_user.hex[:8]}@example.com"},
        )
    direct = JobsClient(redis=arq_redis, sessions=sessions, settings=settings)
    await direct.import_contacts(reference_user, place(settings, source, reference_user))
    await run_burst(
        "imports", settings_=settings.model_copy(update={"import_batch_rows": BATCH_ROWS})
    )
    reference = await snapshot(sessions, reference_user)
    assert reference["import"][:3] == ("completed", ROWS, ROWS)

    # Two workers behind PgBouncer; the one running the import is killed half-way.
    env = worker_env(
        pooled_settings,
        c360_job_modules="jobs.imports",
        import_dir=settings.import_dir,
        import_batch_rows=BATCH_ROWS,
        database_pooler="pgbouncer",
    )
    workers = [processes.start("work", "imports", env=env) for _ in range(2)]
    for worker in workers:
        await wait_for(
            functools.partial(worker_ready, redis_raw, "imports", worker.pid), 20, "workers"
        )
    user = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO users (id, email) VALUES (:id, :email)"),
            {"id": user, "email": f"owner-{user.hex[:8]}@example.com"},
        )
    import_id = (await pooled_client.import_contacts(user, place(settings, source, user))).id

    async def half_way() -> bool:
        status, processed = await progress(sessions, import_id)
        return status == "processing" and processed >= ROWS // 2

    await wait_for(half_way, 60, "half of the import", every_s=0.02)
    victim = await runner_pid(redis_raw, f"import:{import_id}")
    assert victim in {worker.pid for worker in workers}
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    _, checkpoint = await progress(sessions, import_id)

    async def completed() -> bool:
        return (await progress(sessions, import_id))[0] == "completed"

    await wait_for(completed, 90, "the other worker to finish the import")
    print(f"\nSIGKILL at row {checkpoint}: completed {time.monotonic() - killed_at:.1f} s later")
    found = await snapshot(sessions, user)
    assert found == reference
    async with sessions() as session:
        lease = await session.scalar(
            text("SELECT lease_owner FROM contact_import_jobs WHERE id = :id"), {"id": import_id}
        )
    assert lease is None

"""A recycle lets running work finish: a campaign tick on SendGrid and an export, under `run`.

Each test runs the real jobs in real worker processes under `python -m worker run`, with
WORKER_MAX_JOBS_PER_PROCESS=1 so that a short job finishing in the middle of the long one
starts the recycle. The long one must outlive the queue's shutdown grace (10 s default, 20 s
exports), after which the old recycle (a SIGTERM drain) cancelled it.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.jobs import Job
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.exports.factories import job_tries, new_export, user_with_contacts
from tests.reliability.conftest import (
    FIXTURE_MODULES,
    Db,
    Processes,
    gone,
    wait_for,
    wait_gone,
    worker_env,
    worker_ready,
)
from tests.support.provider_server import SENDGRID_MAIL, ProviderServer
from worker.main import QUEUE_CONFIGS
from worker.routes import (
    GENERATE_COMPANY_EXPORT,
    GENERATE_CONTACT_EXPORT,
    SEND_WAITLIST_CAMPAIGN_HOURLY,
    enqueue,
    export_job_id,
)
from worker.serialization import deserialize
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

STARTED = re.compile(r"started (\w+) worker pid=(\d+)")
# 250 steps at 10 sends/s: the tick runs ~25 s, well past the default queue's 10 s grace.
CAMPAIGN_ENTRIES = 250
CAMPAIGN_RATE_PER_S = 10


@pytest.fixture
def sendgrid() -> Iterator[ProviderServer]:
    with ProviderServer(default_delay_s=0.02) as server:
        yield server


def worker_pids_started(processes: Processes, supervisor: subprocess.Popen[bytes]) -> list[int]:
    return [int(match[2]) for match in STARTED.finditer(processes.log(supervisor))]


async def nth_worker(
    processes: Processes, supervisor: subprocess.Popen[bytes], n: int, timeout_s: float
) -> int:
    """The pid of the `n`th worker (1-based) the supervisor started, once it has started."""

    async def started() -> list[int]:
        pids = worker_pids_started(processes, supervisor)
        return pids if len(pids) >= n else []

    pids = await wait_for(started, timeout_s, f"the supervisor to start worker {n}")
    return int(pids[n - 1])


async def test_a_recycle_during_a_campaign_tick_lets_it_finish_on_sendgrid(
    settings: Settings,
    processes: Processes,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: async_sessionmaker[AsyncSession],
    sendgrid: ProviderServer,
    db: Db,
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO waitlist_entries (email, campaign_step, next_email_at, "
                "confirmed_at, created_at) SELECT 'w' || i || '@example.com', 0, "
                "now() - interval '1 hour', now() - interval '1 day', now() - interval '1 day' "
                "FROM generate_series(1, :n) i"
            ),
            {"n": CAMPAIGN_ENTRIES},
        )
    env = worker_env(
        settings,
        c360_job_modules=f"jobs.email,{FIXTURE_MODULES}",
        email_provider="sendgrid",
        email_api_key="SG.recycle-test-key",
        email_api_base_url=sendgrid.base_url,
        email_rate_limit_per_s=CAMPAIGN_RATE_PER_S,
        app_url="https://app.contact360.test",
        secret_key="recycle-test-secret-key-0123456789abcdef",
        worker_max_jobs_per_process=1,
    )
    supervisor = processes.start("run", "--queue", "default", env=env)
    first = await nth_worker(processes, supervisor, 1, 20)
    await wait_for(lambda: worker_ready(redis_raw, "default", first), 20, "worker 1")
    tick = await enqueue(arq_redis, SEND_WAITLIST_CAMPAIGN_HOURLY, "recycle-test-tick")
    assert tick is not None

    async def campaign_sent() -> int:
        return int(
            await db.scalar(
                "SELECT count(*) FROM email_messages "
                "WHERE status = 'sent' AND idempotency_key LIKE 'waitlist/%'"
            )
        )

    async def some_sent() -> bool:
        return await campaign_sent() >= 10

    await wait_for(some_sent, 30, "the tick to send its first steps")
    # Jobs that need no send slot: an email would wait its turn behind the tick's 200 sends at
    # the limiter (20 s on average at 10/s, longer at times), racing the tick's end.
    await arq_redis.enqueue_job("record", key="trigger", _queue_name="default")
    # That job is the worker's first finished one: it recycles with the tick still running,
    # and the supervisor starts the replacement at once.
    second = await nth_worker(processes, supervisor, 2, 30)
    await wait_for(lambda: worker_ready(redis_raw, "default", second), 30, "worker 2")
    await arq_redis.enqueue_job("record", key="after", _queue_name="default")

    async def after_done() -> list[object]:
        return await db.rows("SELECT pid FROM rel_done WHERE key = 'after'")

    [(after_pid,)] = await wait_for(after_done, 30, "the replacement to run the next job")
    # The queue was served by the replacement while the old worker still ran the tick.
    assert after_pid == second
    assert await campaign_sent() < CAMPAIGN_ENTRIES
    assert not gone(first)

    async def tick_done() -> bool:
        return await campaign_sent() == CAMPAIGN_ENTRIES

    await wait_for(tick_done, 60, "the tick to send every step")
    await wait_gone(first, 20, "the recycled worker to exit")

    # One try of the tick, never cancelled: every step sent once, none held for review.
    info = await Job(tick.job_id, arq_redis, _deserializer=deserialize).result_info()
    assert info is not None and (info.job_try, info.success) == (1, True)
    statuses = await db.rows("SELECT status, count(*) FROM email_messages GROUP BY status")
    assert dict(statuses) == {"sent": CAMPAIGN_ENTRIES}
    steps = await db.rows("SELECT campaign_step, count(*) FROM waitlist_entries GROUP BY 1")
    assert dict(steps) == {1: CAMPAIGN_ENTRIES}
    recipients = Counter(
        request.json["personalizations"][0]["to"][0]["email"]
        for request in sendgrid.requests_to(SENDGRID_MAIL)
    )
    assert set(recipients.values()) == {1} and len(recipients) == CAMPAIGN_ENTRIES
    log = processes.log(supervisor)
    assert "recycling this worker: ran 1 jobs" in log
    assert f"default worker pid={first} finished draining, exited with 0" in log
    assert re.search(r"[1-9][0-9]* ongoing to cancel", log) is None  # arq cancelled nothing
    assert supervisor.poll() is None


async def test_a_recycle_during_an_export_lets_it_finish(
    settings: Settings,
    processes: Processes,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: async_sessionmaker[AsyncSession],
    db: Db,
    tmp_path: Path,
) -> None:
    export_dir = tmp_path / "exports"
    env = worker_env(settings, export_dir=export_dir, worker_max_jobs_per_process=1)
    env.pop("C360_JOB_MODULES")  # the real export jobs
    user = await user_with_contacts(sessions, 500)
    # The short exports are another customer's: one user's exports take turns (fair sharing),
    # and the recycle, not the turns, is under test here.
    other_user = await user_with_contacts(sessions, 5)
    long_export = await new_export(sessions, user, "contacts")
    grace_s = QUEUE_CONFIGS["exports"].shutdown_grace_s

    async def status(export_id: uuid.UUID) -> str:
        return str(await db.scalar("SELECT status FROM exports WHERE id = :id", id=export_id))

    async def short_export() -> uuid.UUID:
        export_id = await new_export(sessions, other_user, "companies")
        await enqueue(
            arq_redis,
            GENERATE_COMPANY_EXPORT,
            export_job_id(export_id),
            export_id=str(export_id),
        )
        return export_id

    # The test holds the long export's row: its job waits for the lock in its first update,
    # for as long as the test likes, without spending CPU.
    async with sessions.begin() as holder:
        await holder.execute(
            text("SELECT 1 FROM exports WHERE id = :id FOR UPDATE"), {"id": long_export}
        )
        supervisor = processes.start("run", "--queue", "exports", env=env)
        first = await nth_worker(processes, supervisor, 1, 20)
        await wait_for(lambda: worker_ready(redis_raw, "exports", first), 20, "worker 1")
        await enqueue(
            arq_redis,
            GENERATE_CONTACT_EXPORT,
            export_job_id(long_export),
            export_id=str(long_export),
        )

        async def long_export_waits() -> bool:
            waiting = await db.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            return int(waiting) == 1

        await wait_for(long_export_waits, 20, "the long export to wait for its row")
        trigger = await short_export()

        async def trigger_done() -> bool:
            return await status(trigger) == "completed"

        await wait_for(trigger_done, 20, "the short export")
        second = await nth_worker(processes, supervisor, 2, 30)
        await wait_for(lambda: worker_ready(redis_raw, "exports", second), 30, "worker 2")
        recycled_at = await db.scalar("SELECT extract(epoch FROM clock_timestamp())")
        after = await short_export()

        async def after_done() -> bool:
            return await status(after) == "completed"

        await wait_for(after_done, 30, "the replacement to run the next export")

        async def past_grace() -> bool:
            now = await db.scalar("SELECT extract(epoch FROM clock_timestamp())")
            return float(now - recycled_at) > grace_s + 5

        # Well past the grace after which a SIGTERM drain cancels: the old worker still waits.
        await wait_for(past_grace, grace_s + 10, "the exports queue's grace to pass")
        assert not gone(first)
        assert await status(long_export) != "completed"

    async def long_done() -> bool:
        return await status(long_export) == "completed"

    await wait_for(long_done, 30, "the long export to complete")
    await wait_gone(first, 20, "the recycled worker to exit")
    assert await job_tries(arq_redis, long_export) == (1, True)
    row_count = await db.scalar("SELECT row_count FROM exports WHERE id = :id", id=long_export)
    assert row_count == 500
    written = export_dir / str(user) / f"{long_export}.csv"
    assert len(written.read_bytes().splitlines()) == 501  # the header and every contact
    log = processes.log(supervisor)
    assert f"exports worker pid={first} finished draining, exited with 0" in log
    assert supervisor.poll() is None

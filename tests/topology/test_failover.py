"""SIGKILL of the Redis primary in the middle of an import and a send burst, behind Sentinel.

Real supervisors (`python -m worker run`) for the imports and default queues reach Redis through
the Sentinels; email goes to the fake Resend on a loopback port. The primary is killed while
the import is part-way and the burst is being sent; the Sentinels promote the replica, the
workers exit on the lost connection and their supervisors start fresh ones on the new master.

Replication is asynchronous: what the primary took just before it died may never reach the
replica. The test makes that happen on purpose for a few emails enqueued last: the replica is
writable here, and their jobs are deleted on it alone (a replica's own writes go nowhere), the
state of a replica the primary had not streamed them to yet. PostgreSQL still has their outbox
rows, and the reconciler puts them back.

The import must end exactly as an uninterrupted run of the same file did (counters and digests
of its rows), every email must be delivered once (the fake's record), and nothing is left
pending in PostgreSQL or queued in Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.exceptions
from arq.constants import in_progress_key_prefix, job_key_prefix
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.make_contacts_csv import main as make_contacts_csv
from tests.reliability.conftest import Db, Processes, wait_for, worker_env
from tests.reliability.test_import_faults import import_row, place, snapshot
from tests.support.provider_server import RESEND_BATCH, RESEND_EMAILS, Answer, ProviderServer
from tests.support.users import new_user
from tests.topology.conftest import MASTER_NAME, SentinelCluster, sentinel_env
from worker.client import JobsClient
from worker.serialization import deserialize
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]
Sessions = async_sessionmaker[AsyncSession]
T = TypeVar("T")

ROWS = 60_000
BATCH_ROWS = 2_000
EMAILS = 240
LATE_EMAILS = 4  # enqueued last, then lost with the primary
RATE_PER_S = 30
BURST_S = 8.0  # how long the burst's batches wait for their answers: the kill lands in it


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("failover") / "contacts-60k.csv"
    make_contacts_csv([str(path), "--rows", str(ROWS), "--seed", "14"])
    return path


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


@pytest.fixture
def db(sessions: Sessions) -> Db:
    return Db(sessions)


@pytest.fixture
def resend() -> Iterator[ProviderServer]:
    with ProviderServer(default_delay_s=0.02) as server:
        # The burst goes out in a few batches (jobs/email/batcher.py), each answered after
        # BURST_S: the burst's jobs hold the default queue's slots that long (the late jobs
        # queued behind them stay unclaimed) and the kill lands in it, with the first batch
        # delivered (accepted at once) and the others not yet. The kill restores the delay.
        server.default_delay_s = BURST_S
        server.script(RESEND_BATCH, Answer(accept=True, delay_s=BURST_S))
        yield server


@pytest.fixture
async def jobs(sentinel_settings: Settings) -> AsyncIterator[JobsClient]:
    async with JobsClient.from_settings(sentinel_settings) as client:
        yield client


async def until_redis_answers(call: Callable[[], Awaitable[T]], what: str) -> T:
    """`call()`, retried while the failover leaves no master (what a web app's caller sees)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await call()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            if time.monotonic() > deadline:
                pytest.fail(f"no Redis master within 30 s for {what}")
            await asyncio.sleep(0.2)


async def test_primary_killed_mid_import_and_mid_burst_loses_and_doubles_nothing(
    settings: Settings,
    sentinel_settings: Settings,
    cluster: SentinelCluster,
    processes: Processes,
    resend: ProviderServer,
    jobs: JobsClient,
    sessions: Sessions,
    db: Db,
    csv_file: Path,
) -> None:
    env = {
        **worker_env(
            settings,
            c360_job_modules="",  # the real jobs of each queue, the reconciler among them
            import_dir=settings.import_dir,
            import_batch_rows=BATCH_ROWS,
            email_provider="resend",
            email_api_key="re_test_failover_key",
            email_api_base_url=resend.base_url,
            email_rate_limit_per_s=RATE_PER_S,
        ),
        **sentinel_env(cluster),
    }
    importers = processes.start("run", "--queue", "imports", env=env)
    senders = processes.start("run", "--queue", "default", env=env)

    # The reference: the same file, imported with nothing going wrong.
    reference_user = await new_user(sessions)
    reference = await jobs.import_contacts(
        reference_user, place(settings, csv_file, reference_user)
    )
    await wait_for(lambda: _status_is(db, reference.id, "completed"), 60, "the reference import")
    expected = await snapshot(sessions, reference_user)

    user = await new_user(sessions)
    keys = [f"burst-{n:03}" for n in range(EMAILS)]
    for key in keys:
        await jobs.send_email(f"{key}@example.com", key, f"<p>{key}</p>", idempotency_key=key)
    import_id = (await jobs.import_contacts(user, place(settings, csv_file, user))).id

    async def import_part_way() -> bool:
        status, processed = await import_row(db, import_id)
        return status == "processing" and processed >= ROWS // 4

    await wait_for(import_part_way, 60, "a quarter of the import", every_s=0.02)
    late_keys = [f"late-{n}" for n in range(LATE_EMAILS)]
    late_jobs = [
        (await jobs.send_email(f"{k}@example.com", k, f"<p>{k}</p>", idempotency_key=k)).job_id
        for k in late_keys
    ]
    assert all(late_jobs)
    primary = cluster.node(cluster.primary_port)
    replica = cluster.node(cluster.replica_port)
    try:
        await primary.wait(1, 2000)  # the replica has everything so far; now it misses these
        async with replica.pipeline(transaction=True) as pipe:
            for job_id in late_jobs:
                pipe.delete(job_key_prefix + str(job_id))
                pipe.zrem("default", str(job_id))
            await pipe.execute()
        # Queued behind the burst on the primary: none of them had been claimed yet.
        assert await primary.exists(*(job_key_prefix + str(j) for j in late_jobs)) == LATE_EMAILS
        assert await primary.exists(*(in_progress_key_prefix + str(j) for j in late_jobs)) == 0
        cluster.kill_primary()
        resend.default_delay_s = 0.02  # what is sent from now on is answered at once
    finally:
        await primary.aclose()
        await replica.aclose()
    killed_at = time.monotonic()
    status, at_kill = await import_row(db, import_id)
    delivered_at_kill = len(resend.delivered)
    assert status == "processing" and at_kill < ROWS  # mid-import ...
    assert 0 < delivered_at_kill < EMAILS  # ... and mid-burst

    await wait_for(cluster.failed_over, 30, "the Sentinels to promote the replica")
    failed_over_s = time.monotonic() - killed_at

    # The lost jobs' outbox rows wait in PostgreSQL. The reconciler leaves rows younger than a
    # minute alone (a client may not have enqueued yet): age these, then run it now rather
    # than at the next minute.
    await _age_outbox_rows(sessions, [f"caller/{k}" for k in late_keys])
    await until_redis_answers(
        lambda: jobs.redis.enqueue_job(
            "reconcile_jobs", _job_id="reconcile", _queue_name="default"
        ),
        "enqueueing the reconciler",
    )

    async def reconciled() -> Any:
        raw = await until_redis_answers(lambda: jobs.redis.get("arq:result:reconcile"), "result")
        return deserialize(raw) if raw else None

    outcome = await wait_for(reconciled, 40, "the reconciler to run on the new master")
    assert outcome["s"] is True, outcome
    # Exactly the jobs the replica missed (the minutely cron may have run first and taken some).
    by_cron = await _enqueued_by_cron_reconcilers(jobs)
    assert outcome["r"]["enqueued"] + by_cron == LATE_EMAILS

    await wait_for(lambda: _status_is(db, import_id, "completed"), 60, "the import to complete")

    async def all_sent() -> bool:
        sent = await db.scalar("SELECT count(*) FROM email_messages WHERE status = 'sent'")
        return int(sent) == EMAILS + LATE_EMAILS

    await wait_for(all_sent, 40, "every outbox row to be sent", every_s=0.2)
    settled_s = time.monotonic() - killed_at

    assert await snapshot(sessions, user) == expected
    delivered = Counter(d.json["subject"] for d in resend.delivered)
    assert delivered == Counter(keys + late_keys)  # each once, whatever was requested twice
    # Each request's key: a lone email's own (the caller's namespace), or its batch's.
    requests = [r for r in resend.requests if r.path in (RESEND_EMAILS, RESEND_BATCH)]
    alone = {r.headers["Idempotency-Key"] for r in requests if r.path == RESEND_EMAILS}
    assert alone <= {f"caller/{k}" for k in keys + late_keys}
    assert all(
        r.headers["Idempotency-Key"].startswith("batch/")
        for r in requests
        if r.path == RESEND_BATCH
    )
    emails = [e for r in requests for e in (r.json if r.path == RESEND_BATCH else [r.json])]
    assert {e["subject"] for e in emails} == set(keys + late_keys)
    assert await db.rows("SELECT status, count(*) FROM contact_import_jobs GROUP BY status") == [
        ("completed", 2)
    ]
    assert await db.scalar("SELECT count(*) FROM email_messages WHERE status <> 'sent'") == 0

    async def queues_empty() -> bool:
        counts = [
            await until_redis_answers(lambda q=q: jobs.redis.zcard(q), "queue length")  # type: ignore[misc]
            for q in ("imports", "default")
        ]
        return counts == [0, 0]

    await wait_for(queues_empty, 20, "both queues to drain on the new master")
    for supervisor in (importers, senders):
        assert supervisor.poll() is None
    # The imports worker polls through the kill: it exits with the primary and a fresh one
    # takes over. The default worker may never notice: its 200 slots are taken by the burst's
    # jobs (waiting for their batches), so its poll loop issues no command until the Sentinels
    # have named the new master, and its pool replaces the closed connections at checkout.
    log = processes.log(importers)
    assert "lost Redis" in log, log[-3000:]
    assert log.count("started") >= 2
    print(
        f"\nprimary killed at row {at_kill} and after {delivered_at_kill} deliveries; "
        f"Sentinels failed over in {failed_over_s:.1f} s; everything settled "
        f"{settled_s:.1f} s after the kill"
    )


async def _status_is(db: Db, import_id: uuid.UUID, status: str) -> bool:
    return (await import_row(db, import_id))[0] == status


async def _enqueued_by_cron_reconcilers(jobs: JobsClient) -> int:
    total = 0
    async for key in jobs.redis.scan_iter(match="arq:result:cron:reconcile_jobs:*"):
        raw = await jobs.redis.get(key)
        if raw:
            total += int(deserialize(raw)["r"]["enqueued"])
    return total


async def _age_outbox_rows(sessions: Sessions, keys: list[str]) -> None:
    async with sessions.begin() as session:
        aged = await session.execute(
            text(
                "UPDATE email_messages SET created_at = now() - interval '2 minutes'"
                " WHERE idempotency_key = ANY(:keys) AND status = 'pending'"
            ),
            {"keys": keys},
        )
    assert aged.rowcount == len(keys), "a lost email was sent before its job was lost"  # type: ignore[attr-defined]


async def test_a_manual_failover_moves_the_client_and_the_workers_to_the_new_master(
    settings: Settings,
    cluster: SentinelCluster,
    processes: Processes,
    jobs: JobsClient,
    db: Db,
) -> None:
    """`SENTINEL FAILOVER`: the old master lives on as a replica (a write that still reached it
    would answer READONLY) and the Sentinels drop its clients. The client and a running worker
    must end up on the new master with no one restarting anything by hand."""
    env = {**worker_env(settings, c360_job_modules=""), **sentinel_env(cluster)}
    supervisor = processes.start("run", "--queue", "default", env=env)

    async def sent(key: str) -> bool:
        status = await db.scalar(
            "SELECT status FROM email_messages WHERE idempotency_key = :k", k=f"caller/{key}"
        )
        return bool(status == "sent")

    await jobs.send_email("before@example.com", "Before", "<p>1</p>", idempotency_key="before")
    await wait_for(lambda: sent("before"), 30, "the email sent before the failover")

    sentinel = cluster.sentinel(cluster.sentinel_ports[0])
    try:
        await sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)  # type: ignore[no-untyped-call]
    finally:
        await sentinel.aclose()
    await wait_for(cluster.failed_over, 30, "the Sentinels to promote the replica")

    async def old_primary_demoted() -> bool:
        old = cluster.node(cluster.primary_port)
        try:
            return bool((await old.info("replication")).get("role") == "slave")
        finally:
            await old.aclose()

    await wait_for(old_primary_demoted, 30, "the old primary to follow the new one")
    after = await until_redis_answers(
        lambda: jobs.send_email("after@example.com", "After", "<p>2</p>", idempotency_key="after"),
        "the enqueue after the failover",
    )
    await wait_for(lambda: sent("after"), 40, "the email enqueued after the failover to be sent")
    new_master = cluster.node(cluster.replica_port)
    try:
        assert await new_master.exists(f"arq:result:{after.job_id}") == 1  # run on the new one
    finally:
        await new_master.aclose()
    assert supervisor.poll() is None
    log = processes.log(supervisor)
    print(f"\nmanual failover: worker restarts {log.count('started default worker') - 1}")

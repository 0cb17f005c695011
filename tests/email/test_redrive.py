"""Emails Redis lost are re-driven from PostgreSQL, and delivered exactly once (AUDIT M5).

"Redis lost its data" is a real FLUSHDB of the tests' Redis database; "the enqueue raised
after the commit" is a client whose Redis refuses connections (a port nobody listens on).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import REDIS_OWNER_KEY, RunBurst
from tests.support.ctx import CtxOpener
from tests.support.provider_server import RESEND_BATCH, ProviderServer
from tests.support.result_shapes import assert_shape
from worker.client import JobsClient
from worker.reconcile import MIN_AGE_S, ReconcileResult, reconcile_jobs
from worker.serialization import deserialize, serialize
from worker.settings import Settings

from .conftest import RECIPIENT, outbox_rows
from .test_campaign import entries


async def lose_redis_data(redis_raw: aioredis.Redis) -> None:
    await redis_raw.flushdb()
    await redis_raw.set(REDIS_OWNER_KEY, "1")


async def age_outbox(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Past the reconciler's MIN_AGE_S, as rows written a while before Redis lost them."""
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE email_messages SET created_at = now() - make_interval(secs => :s)"),
            {"s": MIN_AGE_S + 60},
        )


Reconcile = Callable[[], Awaitable[ReconcileResult]]


@pytest.fixture
async def reconcile(open_ctx: CtxOpener) -> Reconcile:
    """One reconciler run, with the default worker's ctx (what the cron runs it with)."""
    ctx = await open_ctx("default")

    async def run() -> ReconcileResult:
        result = await reconcile_jobs.coroutine(ctx)
        assert_shape(result, ReconcileResult)
        return result

    return run


@pytest.fixture
async def dead_redis() -> AsyncIterator[ArqRedis]:
    """A pool (our serializer) whose server is gone: every command fails to connect."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = ArqRedis(
        host="127.0.0.1",
        port=port,
        socket_connect_timeout=1,
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    yield pool
    await pool.aclose()


async def test_emails_redis_lost_are_reenqueued_and_delivered_once(
    reconcile: Reconcile,
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
) -> None:
    await jobs_client.send_email(RECIPIENT, "keyed", "<p>1</p>", idempotency_key="lost-1")
    keyless = await jobs_client.send_email(RECIPIENT, "keyless", "<p>2</p>", "two")
    await jobs_client.send_welcome_email(user_id)
    await lose_redis_data(redis_raw)
    # Queued after the loss: Redis still has this one, so it must not be enqueued again.
    await jobs_client.send_email(RECIPIENT, "still queued", "<p>3</p>", idempotency_key="kept")
    await age_outbox(sessions)

    assert await reconcile() == {"enqueued": 3, "pruned_leases": 0}
    assert await reconcile() == {"enqueued": 0, "pruned_leases": 0}
    worker = await run_burst("default", settings_=job_settings("resend"))

    assert (worker.jobs_complete, worker.jobs_failed) == (4, 0)
    assert sorted(d.json["subject"] for d in provider_server.delivered) == [
        "Welcome to Contact360",
        "keyed",
        "keyless",
        "still queued",
    ]
    # However the four were grouped into requests, each went out once.
    sent = [r.json if r.path == RESEND_BATCH else [r.json] for r in provider_server.requests]
    assert sorted(e["subject"] for batch in sent for e in batch) == sorted(
        d.json["subject"] for d in provider_server.delivered
    )
    # The same arq id as the client's enqueue, so its retries keep sharing one row.
    keyless_row = next(r for r in await outbox_rows(sessions) if r.subject == "keyless")
    assert (keyless_row.idempotency_key, keyless_row.status) == (f"job/{keyless.job_id}", "sent")
    keyless_sent = next(d.json for d in provider_server.delivered if d.json["subject"] == "keyless")
    assert keyless_sent["text"] == "two"  # the stored message, as the caller gave it
    rows = await outbox_rows(sessions)
    assert {(row.idempotency_key, row.status, row.attempts) for row in rows} == {
        ("caller/lost-1", "sent", 1),
        (f"job/{keyless.job_id}", "sent", 1),
        (f"welcome/{user_id}", "sent", 1),
        ("caller/kept", "sent", 1),
    }

    # Redis loses its data again: settled rows are never re-driven.
    await lose_redis_data(redis_raw)
    assert await reconcile() == {"enqueued": 0, "pruned_leases": 0}


async def test_a_reenqueued_email_whose_first_job_still_runs_is_sent_once(
    reconcile: Reconcile,
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Redis lost the job while a worker held it: the old try and the new job both run."""
    await jobs_client.send_email(RECIPIENT, "once", "<p>1</p>", idempotency_key="twice-run")
    await lose_redis_data(redis_raw)
    await age_outbox(sessions)
    assert (await reconcile())["enqueued"] == 1
    # Stands for the worker that had taken the first job before the loss: the same message
    # under another arq id, running alongside the re-enqueued one.
    await arq_redis.enqueue_job(
        "send_email",
        _queue_name="default",
        _job_id="held-by-a-worker",
        to=RECIPIENT,
        subject="once",
        html="<p>1</p>",
        idempotency_key="twice-run",
    )
    provider_server.default_delay_s = 0.2  # both jobs are in flight together
    # Retries slow enough that the job that lost the claim outlasts the one sending.
    settings = job_settings("resend", max_retries=5, retry_base_delay_s=0.1)
    worker = await run_burst("default", settings_=settings)

    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)
    assert [d.json["subject"] for d in provider_server.delivered] == ["once"]
    [row] = await outbox_rows(sessions)
    assert (row.idempotency_key, row.status, row.attempts) == ("caller/twice-run", "sent", 1)


async def test_send_email_whose_enqueue_raised_after_the_commit_is_still_sent(
    reconcile: Reconcile,
    settings: Settings,
    dead_redis: ArqRedis,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    client = JobsClient(redis=dead_redis, sessions=sessions, settings=settings)
    with pytest.raises((redis.exceptions.ConnectionError, OSError)):
        await client.send_email(RECIPIENT, "after all", "<p>1</p>", idempotency_key="no-redis")
    [row] = await outbox_rows(sessions)
    assert (row.idempotency_key, row.status) == ("caller/no-redis", "pending")
    await age_outbox(sessions)

    assert (await reconcile())["enqueued"] == 1
    await run_burst("default", settings_=job_settings("resend"))
    assert [d.json["subject"] for d in provider_server.delivered] == ["after all"]


async def test_a_waitlist_kickoff_redis_lost_is_sent_by_the_hourly_campaign(
    client_of: Callable[..., JobsClient],
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    signup = await client_of(waitlist_confirm=False).join_waitlist("wendy@example.com", "Wendy")
    await lose_redis_data(redis_raw)
    settings = job_settings("resend")
    await arq_redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")
    await run_burst("default", settings_=settings)
    assert [d.json["to"] for d in provider_server.delivered] == [["wendy@example.com"]]
    # The kickoff turns up after all (a duplicate delivery), and the next tick runs: nothing new.
    await arq_redis.enqueue_job(
        "kickoff_waitlist_first_email", _queue_name="default", entry_id=str(signup.id)
    )
    await arq_redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")
    await run_burst("default", settings_=settings)

    [delivery] = provider_server.delivered
    assert delivery.json["subject"] == "You're on the Contact360 waitlist"
    assert delivery.json["to"] == ["wendy@example.com"]
    assert (await entries(sessions))[signup.id].campaign_step == 1


async def test_join_waitlist_whose_enqueue_raised_after_the_commit_still_gets_step_1(
    dead_redis: ArqRedis,
    client_of: Callable[..., JobsClient],
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    jobs_client = client_of(waitlist_confirm=False)
    client = JobsClient(redis=dead_redis, sessions=sessions, settings=jobs_client.settings)
    with pytest.raises((redis.exceptions.ConnectionError, OSError)):
        await client.join_waitlist("wendy@example.com", name="Wendy")
    # The person tries again once the page errors: the entry is already there.
    again = await jobs_client.join_waitlist("wendy@example.com", name="Wendy")
    assert again.created is False
    await arq_redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")
    await run_burst("default", settings_=job_settings("resend"))

    [delivery] = provider_server.delivered
    assert delivery.json["subject"] == "You're on the Contact360 waitlist"
    entry = (await entries(sessions))[again.id]
    assert entry.campaign_step == 1

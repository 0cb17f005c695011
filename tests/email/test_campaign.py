"""The waitlist campaign: kickoff, the hourly cron's catch-up, re-runs and two workers per tick."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.worker import Worker
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import WaitlistEntry
from jobs.email import campaign
from tests.conftest import RunBurst
from tests.support.provider_server import RESEND_BATCH, ProviderServer
from worker.client import JobsClient
from worker.main import worker_settings
from worker.settings import Settings

from .conftest import outbox_rows

NOW = datetime.now(UTC)


async def add_entry(
    sessions: async_sessionmaker[AsyncSession],
    *,
    age: timedelta,
    step: int,
    next_at: datetime | None,
    **extra: Any,
) -> uuid.UUID:
    entry_id = uuid.uuid4()
    async with sessions.begin() as session:
        session.add(
            WaitlistEntry(
                id=entry_id,
                email=f"w-{entry_id.hex[:8]}@example.com",
                name="Wendy Waits",
                campaign_step=step,
                created_at=NOW - age,
                confirmed_at=extra.pop("confirmed_at", NOW - age),
                next_email_at=next_at,
                **extra,
            )
        )
    return entry_id


async def entries(sessions: async_sessionmaker[AsyncSession]) -> dict[uuid.UUID, WaitlistEntry]:
    async with sessions() as session:
        return {e.id: e for e in await session.scalars(select(WaitlistEntry))}


def subjects(server: ProviderServer) -> list[str]:
    return sorted(d.json["subject"] for d in server.delivered)


async def test_join_waitlist_sends_step_1_once_and_schedules_step_2(
    client_of: Callable[..., JobsClient],
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    jobs_client = client_of(waitlist_confirm=False)  # no double opt-in: step 1 at once
    signup = await jobs_client.join_waitlist("Wendy@Example.com", name="Wendy")
    # A duplicate delivery of the kickoff job, under another arq id.
    await arq_redis.enqueue_job(
        "kickoff_waitlist_first_email", _queue_name="default", entry_id=str(signup.id)
    )
    await run_burst("default", settings_=job_settings("resend"))

    [delivery] = provider_server.delivered
    assert delivery.json["to"] == ["wendy@example.com"]
    assert delivery.json["subject"] == "You're on the Contact360 waitlist"
    assert "/email/unsubscribe/" in delivery.json["html"]
    assert str(signup.id) not in delivery.json["html"]  # the link is a token, not the id
    [request] = provider_server.requests  # the duplicate saw step 1 done and sent nothing
    assert request.headers["Idempotency-Key"] == f"waitlist/{signup.id}/1"
    entry = (await entries(sessions))[signup.id]
    assert entry.campaign_step == 1
    assert entry.next_email_at == entry.created_at + timedelta(days=2)


async def test_hourly_campaign_sends_what_is_due_and_a_second_run_sends_nothing(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    day = timedelta(days=1)
    step2 = [
        await add_entry(sessions, age=2 * day + timedelta(hours=h), step=1, next_at=None)
        for h in (1, 5)
    ]
    step3 = await add_entry(sessions, age=8 * day, step=2, next_at=None)
    not_yet = await add_entry(sessions, age=day, step=1, next_at=NOW + day)
    unsubscribed = await add_entry(sessions, age=3 * day, step=1, next_at=None, unsubscribed_at=NOW)
    converted = await add_entry(sessions, age=3 * day, step=1, next_at=None, converted_at=NOW)
    async with sessions.begin() as session:  # due as scheduled: created + 2 days / + 7 days
        await session.execute(
            text(
                "UPDATE waitlist_entries SET next_email_at = created_at + make_interval("
                "days => CASE campaign_step WHEN 1 THEN 2 ELSE 7 END) WHERE next_email_at IS NULL"
            )
        )
    settings = job_settings("resend")

    for _ in range(2):  # the same hour, twice
        await arq_redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")
        await run_burst("default", settings_=settings)

    assert subjects(provider_server) == sorted(
        ["How Contact360 keeps your contacts in one place"] * 2
        + ["Your Contact360 spot is almost ready"]
    )
    # The tick's three steps went out together: one batch request, and nothing the second time.
    [batch] = provider_server.requests
    assert (batch.path, len(batch.json)) == (RESEND_BATCH, 3)
    rows = {row.idempotency_key for row in await outbox_rows(sessions)}
    assert rows == {f"waitlist/{e}/2" for e in step2} | {f"waitlist/{step3}/3"}
    after = await entries(sessions)
    for entry_id in step2:
        assert after[entry_id].campaign_step == 2
        assert after[entry_id].next_email_at == after[entry_id].created_at + 7 * day
    assert (after[step3].campaign_step, after[step3].next_email_at) == (3, None)
    for untouched in (not_yet, unsubscribed, converted):
        assert after[untouched].campaign_step == 1


async def test_a_backlog_is_caught_up_page_by_page_without_crowding_steps(
    monkeypatch: pytest.MonkeyPatch,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    monkeypatch.setattr(campaign, "PAGE_ROWS", 2)  # 5 due entries: three pages
    monkeypatch.setattr(campaign, "SEND_CONCURRENCY", 2)
    overdue = [
        await add_entry(sessions, age=timedelta(days=10), step=1, next_at=NOW - timedelta(days=8))
        for _ in range(5)
    ]
    await arq_redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")
    await run_burst("default", settings_=job_settings("sendgrid"))

    assert len(provider_server.delivered) == 5
    after = await entries(sessions)
    for entry_id in overdue:
        # Step 3 was due too (sign-up + 7 days), but not minutes after step 2.
        assert after[entry_id].campaign_step == 2
        next_at = after[entry_id].next_email_at
        assert next_at is not None and next_at >= NOW + campaign.MIN_STEP_GAP


async def test_a_refused_step_is_settled_and_a_transient_one_stays_due(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    from tests.support.provider_server import SENDGRID_MAIL, Answer

    provider_server.script(SENDGRID_MAIL, Answer(status=400), Answer(status=503))
    due = [
        await add_entry(sessions, age=timedelta(days=3), step=1, next_at=NOW - timedelta(hours=1))
        for _ in range(3)
    ]
    campaign_job = campaign.send_waitlist_campaign_hourly
    await arq_redis.enqueue_job(campaign_job.name, _queue_name="default")
    await run_burst("default", jobs=[campaign_job], crons=[], settings_=job_settings("sendgrid"))

    statuses = sorted(row.status for row in await outbox_rows(sessions))
    assert statuses == ["failed", "pending", "sent"]
    after = await entries(sessions)
    assert sorted(after[e].campaign_step for e in due) == [1, 2, 2]  # the pending one waits

    await arq_redis.enqueue_job(campaign_job.name, _queue_name="default")
    await run_burst("default", jobs=[campaign_job], crons=[], settings_=job_settings("sendgrid"))
    statuses = sorted(row.status for row in await outbox_rows(sessions))
    assert statuses == ["failed", "sent", "sent"]
    assert len(provider_server.requests) == 4


async def test_two_default_workers_running_the_same_tick_send_once(
    settings: Settings,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    for _ in range(3):
        await add_entry(sessions, age=timedelta(days=3), step=1, next_at=NOW - timedelta(hours=1))
    tick = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    workers = []
    for _ in range(2):  # two workers, each with its own Redis pool and its own ctx
        kwargs = worker_settings("default", job_settings("resend"), burst=True)
        kwargs.update(poll_delay=0, handle_signals=False)
        worker = Worker(**kwargs)
        for cron_job in worker.cron_jobs:
            cron_job.next_run = tick  # both see the same tick of every cron as due now
        workers.append(worker)
    try:
        await asyncio.gather(*(worker.async_run() for worker in workers))
    finally:
        for worker in workers:
            await worker.close()

    # One run per cron job (campaign, trials, marketing sync, reconciler), not one per worker.
    assert sum(worker.jobs_complete for worker in workers) == len(workers[0].cron_jobs) == 4
    assert len(provider_server.delivered) == 3
    [batch] = provider_server.requests  # the three steps in one batch request
    assert len(batch.json) == 3

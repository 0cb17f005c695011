"""`check_trial_expirations`: a reminder once, an expiry notice once, the plan expired with it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from arq.connections import ArqRedis
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import User
from tests.conftest import RunBurst
from tests.support.provider_server import RESEND_EMAILS, Answer, ProviderServer
from worker.settings import Settings

from .conftest import outbox_rows


async def add_user(
    sessions: async_sessionmaker[AsyncSession], ends_in: timedelta, plan: str = "trial"
) -> uuid.UUID:
    user_id = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO users (id, email, name, plan, trial_ends_at) "
                "VALUES (:id, :email, 'Tina Trial', :plan, :ends)"
            ),
            {
                "id": user_id,
                "email": f"t-{user_id.hex[:8]}@example.com",
                "plan": plan,
                "ends": datetime.now(UTC) + ends_in,
            },
        )
    return user_id


async def plans(sessions: async_sessionmaker[AsyncSession]) -> dict[uuid.UUID, str]:
    async with sessions() as session:
        return {u.id: u.plan for u in await session.scalars(select(User))}


async def test_reminder_and_expiry_notice_are_sent_once(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ending = await add_user(sessions, timedelta(days=2, hours=1))
    later = await add_user(sessions, timedelta(days=5))
    ended = await add_user(sessions, -timedelta(hours=1))
    paying = await add_user(sessions, -timedelta(days=30), plan="pro")
    settings = job_settings("resend")

    for _ in range(3):  # the cron's tick, then two more runs: nothing new
        await arq_redis.enqueue_job("check_trial_expirations", _queue_name="default")
        await run_burst("default", settings_=settings)

    sent = {d.json["to"][0]: d.json["subject"] for d in provider_server.delivered}
    assert sent == {
        f"t-{ending.hex[:8]}@example.com": "Your Contact360 trial ends in 2 days",
        f"t-{ended.hex[:8]}@example.com": "Your Contact360 trial has ended",
    }
    assert len(provider_server.requests) == 2
    keys = {row.idempotency_key for row in await outbox_rows(sessions)}
    assert keys == {f"trial-reminder/{ending}", f"trial-expired/{ended}"}
    assert await plans(sessions) == {
        ending: "trial",
        later: "trial",
        ended: "expired",
        paying: "pro",
    }


async def test_the_plan_waits_for_a_settled_notice(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ended = await add_user(sessions, -timedelta(minutes=5))
    provider_server.script(RESEND_EMAILS, Answer(status=500))
    settings = job_settings("resend")

    await arq_redis.enqueue_job("check_trial_expirations", _queue_name="default")
    await run_burst("default", settings_=settings)
    assert (await plans(sessions))[ended] == "trial"  # the notice is not settled: not expired
    [row] = await outbox_rows(sessions)
    # Resend's 500 may follow an acceptance: the notice keeps its claim (released, no claimer)
    # so the next tick resends that same request under the same key.
    assert (row.status, row.claimed_by) == ("sending", None)

    await arq_redis.enqueue_job("check_trial_expirations", _queue_name="default")
    await run_burst("default", settings_=settings)
    assert (await plans(sessions))[ended] == "expired"
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("sent", 2)
    assert len(provider_server.delivered) == 1

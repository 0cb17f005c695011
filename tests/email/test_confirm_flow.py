"""Confirmed opt-in end to end: sign-up -> confirmation email -> POST confirm over HTTP ->
step 1; an unconfirmed sign-up gets nothing more and expires; a lost kickoff is re-driven."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import WaitlistEntry
from jobs.email.drafts import CONFIRM_TTL
from tests.conftest import REDIS_OWNER_KEY
from tests.support.provider_server import ProviderServer
from worker.client import JobsClient
from worker.tokens import UNSUBSCRIBE, make_token

from .conftest import APP_URL, SECRET_KEY, CampaignRig

CONFIRM_SUBJECT = "Confirm your place on the Contact360 waitlist"
STEP_1_SUBJECT = "You're on the Contact360 waitlist"


@pytest.fixture
def jobs(client_of: Callable[..., JobsClient]) -> JobsClient:
    return client_of()  # WAITLIST_CONFIRM is on by default


async def entry(sessions: async_sessionmaker[AsyncSession], entry_id: uuid.UUID) -> WaitlistEntry:
    async with sessions() as session:
        found = await session.get(WaitlistEntry, entry_id)
    assert found is not None
    return found


async def lose_redis_data(redis_raw: aioredis.Redis) -> None:
    await redis_raw.flushdb()
    await redis_raw.set(REDIS_OWNER_KEY, "1")


def confirm_link(server: ProviderServer) -> str:
    [sent] = [d.json for d in server.delivered if d.json["subject"] == CONFIRM_SUBJECT]
    [link] = [w for w in sent["text"].split() if w.startswith(f"{APP_URL}/waitlist/confirm/")]
    assert f'href="{link}"' in sent["html"]
    return str(link)


async def test_sign_up_confirm_over_http_then_the_next_tick_sends_step_1(
    jobs: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    redis_raw: aioredis.Redis,
    rig: CampaignRig,
    public_url: str,
) -> None:
    signup = await jobs.join_waitlist("wendy@example.com", name="Wendy")
    await rig.run_jobs()  # the kickoff job
    assert rig.subjects() == [CONFIRM_SUBJECT]
    [request] = rig.server.requests
    assert request.headers["Idempotency-Key"] == f"waitlist-confirm/{signup.id}"
    assert "headers" not in request.json  # not campaign mail: nothing to unsubscribe from yet
    waiting = await entry(sessions, signup.id)
    assert (waiting.confirmed_at, waiting.next_email_at, waiting.campaign_step) == (None, None, 0)

    await rig.tick()  # unconfirmed: the tick sends nothing
    assert len(rig.server.delivered) == 1

    link = confirm_link(rig.server)
    async with httpx.AsyncClient(base_url=public_url) as http:
        page = await http.get(link.removeprefix(APP_URL))
        assert page.status_code == 200 and "Confirm" in page.text
        assert (await entry(sessions, signup.id)).confirmed_at is None  # GET changes nothing
        assert (await http.post(link.removeprefix(APP_URL))).status_code == 200
    confirmed = await entry(sessions, signup.id)
    assert confirmed.confirmed_at is not None and confirmed.next_email_at is not None

    # The kickoff that confirm_waitlist enqueued is lost with Redis: the hourly tick covers it.
    await lose_redis_data(redis_raw)
    await rig.tick()
    step_1 = [d.json for d in rig.server.delivered if d.json["subject"] == STEP_1_SUBJECT]
    assert [d["to"] for d in step_1] == [["wendy@example.com"]]
    token = make_token(UNSUBSCRIBE, signup.id, SecretStr(SECRET_KEY))
    assert step_1[0]["headers"]["List-Unsubscribe"] == f"<{APP_URL}/email/unsubscribe/{token}>"
    done = await entry(sessions, signup.id)
    assert done.campaign_step == 1
    assert done.confirmed_at is not None
    assert done.next_email_at == done.confirmed_at + timedelta(days=2)


async def test_confirming_twice_starts_the_campaign_once(
    jobs: JobsClient, sessions: async_sessionmaker[AsyncSession], rig: CampaignRig
) -> None:
    signup = await jobs.join_waitlist("wendy@example.com", name="Wendy")
    await rig.run_jobs()
    token = confirm_link(rig.server).rsplit("/", 1)[1]
    assert await jobs.confirm_waitlist(token) is True
    first = (await entry(sessions, signup.id)).confirmed_at
    assert await jobs.confirm_waitlist(token) is True  # a double click
    assert (await entry(sessions, signup.id)).confirmed_at == first
    await rig.run_jobs()  # the kickoff: step 1 at once
    await rig.tick()
    assert rig.subjects() == [CONFIRM_SUBJECT, STEP_1_SUBJECT]
    # An unsubscribe token is not a confirm token, nor the reverse.
    unsubscribe_token = make_token(UNSUBSCRIBE, signup.id, SecretStr(SECRET_KEY))
    assert await jobs.confirm_waitlist(unsubscribe_token) is False
    assert await jobs.unsubscribe(token) is False
    assert (await entry(sessions, signup.id)).unsubscribed_at is None


async def test_an_unconfirmed_sign_up_gets_nothing_more_and_expires(
    jobs: JobsClient, sessions: async_sessionmaker[AsyncSession], rig: CampaignRig, public_url: str
) -> None:
    signup = await jobs.join_waitlist("wendy@example.com", name="Wendy")
    await rig.run_jobs()
    link = confirm_link(rig.server)

    async def age(by: timedelta) -> None:
        async with sessions.begin() as session:
            await session.execute(
                text("UPDATE waitlist_entries SET created_at = now() - make_interval(secs => :s)"),
                {"s": by.total_seconds()},
            )

    await age(timedelta(days=3))  # step 2 would be due by now: still nothing
    await rig.tick()
    assert len(rig.server.delivered) == 1

    await age(CONFIRM_TTL + timedelta(hours=1))
    await rig.tick()
    assert len(rig.server.delivered) == 1
    async with sessions() as session:
        assert (await session.scalars(select(WaitlistEntry))).all() == []
    async with httpx.AsyncClient(base_url=public_url) as http:
        late = await http.post(link.removeprefix(APP_URL))
    assert late.status_code == 400  # the entry is gone: the link says so, and changes nothing

    again = await jobs.join_waitlist("wendy@example.com", name="Wendy")  # a fresh start
    assert again.created and again.id != signup.id


async def test_a_confirmation_whose_kickoff_redis_lost_is_sent_by_the_hourly_tick(
    jobs: JobsClient, redis_raw: aioredis.Redis, rig: CampaignRig
) -> None:
    await jobs.join_waitlist("wendy@example.com", name="Wendy")
    await lose_redis_data(redis_raw)
    await rig.tick()
    assert rig.subjects() == [CONFIRM_SUBJECT]
    await rig.tick()  # sent once, then nothing is due
    assert len(rig.server.delivered) == 1


async def test_without_app_url_no_waitlist_email_goes_one_error_and_transactional_still_does(
    client_of: Callable[..., JobsClient],
    sessions: async_sessionmaker[AsyncSession],
    rig: CampaignRig,
    user_id: uuid.UUID,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jobs = client_of(app_url=None, waitlist_confirm=False)
    signup = await jobs.join_waitlist("wendy@example.com", name="Wendy")
    await jobs.send_welcome_email(user_id)
    unconfigured = CampaignRig(rig.arq_redis, rig.run_burst, jobs.settings, rig.server)
    with caplog.at_level(logging.WARNING):
        await unconfigured.tick()  # the kickoff, the welcome and the tick

    assert rig.subjects() == ["Welcome to Contact360"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["jobs.email.campaign"]
    assert "APP_URL" in errors[0].getMessage() and "not set" in errors[0].getMessage()
    due = await entry(sessions, signup.id)
    assert (due.campaign_step, due.next_email_at is not None) == (0, True)  # still due

    await rig.tick()  # configured: step 1 goes out
    assert STEP_1_SUBJECT in rig.subjects()

"""A provider that refuses the account (a revoked key, an unverified domain) fails no message.

The operator's view: someone rotates `EMAIL_API_KEY` or the sending domain loses its
verification during a tick. Every due campaign step, trial notice and transactional email must
stay due (pending, unskipped, no attempt counted), sending must pause everywhere with one clear
log line, and once the key is fixed the next tick sends them all.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from arq.connections import ArqRedis
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import worker.email_providers.base
from jobs.email import campaign, trials
from tests.conftest import RunBurst
from tests.support.provider_server import (
    RESEND_BATCH,
    RESEND_EMAILS,
    SENDGRID_MAIL,
    Answer,
    ProviderServer,
)
from worker.client import JobsClient
from worker.email_providers import OutgoingEmail, ResendProvider
from worker.errors import PermanentError, ProviderFault
from worker.ratelimit import RateLimiter
from worker.settings import Settings

from .conftest import API_KEY, RECIPIENT, outbox_rows
from .test_campaign import add_entry, entries
from .test_trials import add_user, plans

NOW = datetime.now(UTC)
# Resend's answer to a revoked key (https://resend.com/docs/api-reference/errors), echoing the
# key back as a careless proxy might: it must still never reach a log line or a row.
INVALID_KEY = Answer(
    status=403, body={"statusCode": 403, "name": "invalid_api_key", "message": f"{API_KEY}?"}
)
# SendGrid's answer when EMAIL_FROM's domain is not (or no longer) verified (Twilio error 60222).
UNVERIFIED_SENDER = Answer(
    status=403,
    body={
        "errors": [
            {
                "message": "The from address does not match a verified Sender Identity.",
                "field": "from",
            }
        ]
    },
)


@pytest.fixture
def limiter(redis: Redis) -> RateLimiter:
    """The email limiter every worker shares (its default keys in the rig's Redis db)."""
    return RateLimiter(redis, 1000.0)


@pytest.fixture
def short_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """The halt after a refusal lasts 50 ms instead of 5 minutes, so a burst run ends."""
    monkeypatch.setattr(worker.email_providers.base, "PROVIDER_FAULT_PAUSE_S", 0.05, raising=False)


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and "refused the account" in r.getMessage()
    ]


async def test_a_revoked_key_leaves_every_campaign_step_due_until_the_key_is_fixed(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    limiter: RateLimiter,
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(campaign, "PAGE_ROWS", 2)  # 5 due entries: three pages
    monkeypatch.setattr(campaign, "SEND_CONCURRENCY", 2)
    due = [
        await add_entry(sessions, age=timedelta(days=3), step=1, next_at=NOW - timedelta(hours=1))
        for _ in range(5)
    ]
    before = {e.id: (e.campaign_step, e.next_email_at) for e in (await entries(sessions)).values()}
    provider_server.always(RESEND_EMAILS, INVALID_KEY)
    provider_server.always(RESEND_BATCH, INVALID_KEY)  # a page's two sends go as one batch
    job = campaign.send_waitlist_campaign_hourly
    settings = job_settings("resend")

    # More ticks than a message has attempts (MAX_RETRIES + 1 = 3): none of them may count.
    for _ in range(settings.max_retries + 2):
        await arq_redis.enqueue_job(job.name, _queue_name="default")
        worker = await run_burst("default", jobs=[job], crons=[], settings_=settings)
        assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
        assert await limiter.halted() is not None  # every worker stops sending
        await limiter.resume()  # the 5 minutes pass: the next tick probes the provider again

    # The tick stopped at the refusal: the later pages were never read, let alone sent.
    assert len(provider_server.requests) <= (settings.max_retries + 2) * campaign.PAGE_ROWS
    assert provider_server.delivered == []
    rows = await outbox_rows(sessions)
    assert rows and len(rows) <= campaign.PAGE_ROWS
    for row in rows:
        assert (row.status, row.attempts) == ("pending", 0)
        assert row.last_error is not None and "invalid_api_key" in row.last_error
        assert API_KEY not in row.last_error
    after = {e.id: (e.campaign_step, e.next_email_at) for e in (await entries(sessions)).values()}
    assert after == before  # nothing skipped, nothing rescheduled
    # One clear line per halt, saying what to check, never the key.
    lines = refusal_lines(caplog)
    assert len(lines) == settings.max_retries + 2
    assert "EMAIL_API_KEY" in lines[0]
    assert API_KEY not in caplog.text

    provider_server.fix(RESEND_EMAILS)  # the operator deployed a valid key
    provider_server.fix(RESEND_BATCH)
    await arq_redis.enqueue_job(job.name, _queue_name="default")
    await run_burst("default", jobs=[job], crons=[], settings_=settings)

    assert len(provider_server.delivered) == len(due)
    assert {(r.status, r.attempts) for r in await outbox_rows(sessions)} == {("sent", 1)}
    assert {e.campaign_step for e in (await entries(sessions)).values()} == {2}


async def test_an_unverified_sending_domain_expires_no_trial_without_its_notice(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    limiter: RateLimiter,
) -> None:
    ended = await add_user(sessions, -timedelta(hours=1))
    provider_server.always(SENDGRID_MAIL, UNVERIFIED_SENDER)
    job = trials.check_trial_expirations
    settings = job_settings("sendgrid")

    for _ in range(settings.max_retries + 2):
        await arq_redis.enqueue_job(job.name, _queue_name="default")
        await run_burst("default", jobs=[job], crons=[], settings_=settings)
        await limiter.resume()

    assert (await plans(sessions))[ended] == "trial"
    [row] = await outbox_rows(sessions)
    assert (row.idempotency_key, row.status, row.attempts) == (
        f"trial-expired/{ended}",
        "pending",
        0,
    )
    assert row.last_error is not None and "verified Sender Identity" in row.last_error

    provider_server.fix(SENDGRID_MAIL)
    await arq_redis.enqueue_job(job.name, _queue_name="default")
    await run_burst("default", jobs=[job], crons=[], settings_=settings)
    assert (await plans(sessions))[ended] == "expired"
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("sent", 1)
    assert len(provider_server.delivered) == 1


@pytest.mark.usefixtures("short_pause")
async def test_send_email_waits_out_a_missing_key_without_using_up_its_tries(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    missing = {"statusCode": 401, "name": "missing_api_key", "message": "Missing API key"}
    settings = job_settings("resend")
    refusals = settings.max_retries + 3  # more than the job has tries
    provider_server.script(RESEND_EMAILS, *[Answer(status=401, body=missing)] * refusals)
    await jobs_client.send_email(RECIPIENT, "Your export", "<p>ready</p>", idempotency_key="e-1")
    worker = await run_burst("default", settings_=settings)

    assert len(provider_server.requests) == refusals + 1
    assert len(provider_server.delivered) == 1
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts, row.last_error) == ("sent", 1, None)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert worker.jobs_retried == refusals


@pytest.mark.parametrize(
    ("status", "name", "account"),
    [
        (401, "missing_api_key", True),
        (401, "restricted_api_key", True),
        (403, "invalid_api_key", True),
        (403, "validation_error", True),  # "The example.com domain is not verified"
        (422, "invalid_from_address", True),
        (422, "validation_error", False),  # a bad `to`: this message's own fault
        (400, "validation_error", False),
    ],
)
async def test_resend_refusals_of_the_account_are_told_apart_from_the_message(
    status: int, name: str, account: bool, http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    body = {"statusCode": status, "name": name, "message": "refused"}
    provider_server.script(RESEND_EMAILS, Answer(status=status, body=body))
    provider = ResendProvider(
        http=http, api_key=SecretStr(API_KEY), base_url=provider_server.base_url
    )
    email = OutgoingEmail(
        sender="C <no-reply@contact360.test>", to=(RECIPIENT,), subject="s", html="h"
    )
    with pytest.raises((ProviderFault, PermanentError)) as info:
        await provider.send(email, f"k-{uuid.uuid4()}")
    assert isinstance(info.value, ProviderFault) is account

"""`send_email` and `send_welcome_email` end to end: wire payloads, retries, refusals, hangs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.support.provider_server import RESEND_EMAILS, SENDGRID_MAIL, Answer, ProviderServer
from worker.client import JobsClient
from worker.settings import Settings

from .conftest import API_KEY, RECIPIENT, outbox_rows

SUBJECT = "Your export is ready"
HTML = "<p>Download it <a href='https://x.test/e/1'>here</a></p>"
TEXT = "Download it: https://x.test/e/1"


async def test_resend_wire_payload_and_outbox_row(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, TEXT, idempotency_key="export/1")
    worker = await run_burst("default", settings_=job_settings("resend"))

    [request] = provider_server.requests
    assert (request.method, request.path) == ("POST", RESEND_EMAILS)
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Idempotency-Key"] == "caller/export/1"
    assert request.json == {
        "from": "Contact360 <no-reply@contact360.test>",
        "to": [RECIPIENT],
        "subject": SUBJECT,
        "html": HTML,
        "text": TEXT,
    }
    [delivery] = provider_server.delivered
    [row] = await outbox_rows(sessions)
    assert (row.idempotency_key, row.status, row.attempts) == ("caller/export/1", "sent", 1)
    assert (row.provider, row.provider_message_id) == ("resend", delivery.provider_id)
    assert row.sent_at is not None
    assert row.last_error is None
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)


async def test_sendgrid_wire_payload_of_the_welcome_email(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
) -> None:
    await jobs_client.send_welcome_email(user_id)
    await run_burst("default", settings_=job_settings("sendgrid"))

    [request] = provider_server.requests
    assert (request.method, request.path) == ("POST", SENDGRID_MAIL)
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert "Idempotency-Key" not in request.headers
    body = request.json
    assert body["personalizations"] == [{"to": [{"email": f"owner-{user_id.hex[:8]}@example.com"}]}]
    assert body["from"] == {"email": "no-reply@contact360.test", "name": "Contact360"}
    assert body["subject"] == "Welcome to Contact360"
    assert [part["type"] for part in body["content"]] == ["text/plain", "text/html"]
    assert "Your account is ready" in body["content"][1]["value"]
    assert body["custom_args"] == {"c360_idempotency_key": f"welcome/{user_id}"}
    [row] = await outbox_rows(sessions)
    assert row.idempotency_key == f"welcome/{user_id}"
    assert row.provider_message_id == provider_server.delivered[0].provider_id


async def test_429_pauses_every_sender_and_the_retry_waits(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    arq_redis: ArqRedis,
) -> None:
    provider_server.script(RESEND_EMAILS, Answer(status=429, headers={"retry-after": "1"}))
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, idempotency_key="k-429")
    started = time.monotonic()
    await run_burst("default", settings_=job_settings("resend"))
    elapsed_s = time.monotonic() - started

    first, second = provider_server.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "caller/k-429"
    # The provider asked for 1 s; the retry (base delay 0.01 s) must not come sooner.
    assert elapsed_s >= 0.95
    [row] = await outbox_rows(sessions)
    # The 429 gave its attempt back (audit H4): only the send that went through counts.
    assert (row.status, row.attempts) == ("sent", 1)
    assert len(provider_server.delivered) == 1


async def test_500_then_success(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    provider_server.script(SENDGRID_MAIL, Answer(status=500, body={"errors": []}))
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, idempotency_key="k-500")
    worker = await run_burst("default", settings_=job_settings("sendgrid"))

    assert len(provider_server.requests) == 2
    assert len(provider_server.delivered) == 1
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, None)
    assert (worker.jobs_complete, worker.jobs_retried, worker.jobs_failed) == (1, 1, 0)


@pytest.mark.parametrize("provider", ["resend", "sendgrid"])
async def test_422_fails_at_once_with_the_providers_message(
    provider: str,
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    path, body = (
        (RESEND_EMAILS, {"statusCode": 422, "name": "validation_error", "message": "Bad `to`"})
        if provider == "resend"
        else (SENDGRID_MAIL, {"errors": [{"message": "Bad to", "field": "personalizations"}]})
    )
    provider_server.script(path, Answer(status=422, body=body))
    await jobs_client.send_email("not-an-inbox@example.invalid", SUBJECT, HTML)
    worker = await run_burst("default", settings_=job_settings(provider))

    assert len(provider_server.requests) == 1  # no retry
    [row] = await outbox_rows(sessions)
    assert row.status == "failed"
    assert row.attempts == 1
    assert row.idempotency_key.startswith("job/")
    expected = "validation_error: Bad `to`" if provider == "resend" else "personalizations: Bad to"
    assert row.last_error is not None and expected in row.last_error
    assert (worker.jobs_failed, worker.jobs_retried) == (1, 0)


async def test_resend_hang_hits_our_timeout_and_resends_with_the_same_key(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    provider_server.script(RESEND_EMAILS, Answer(hang=True))
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, idempotency_key="k-hang")
    started = time.monotonic()
    await run_burst("default", settings_=job_settings("resend"))

    assert time.monotonic() - started < 10  # the 1 s read timeout, not the hang, ended it
    first, second = provider_server.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "caller/k-hang"
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("sent", 2)


async def test_sendgrid_hang_goes_to_review_and_is_not_resent(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    provider_server.script(SENDGRID_MAIL, Answer(hang=True))
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, idempotency_key="k-hang")
    worker = await run_burst("default", settings_=job_settings("sendgrid"))

    assert len(provider_server.requests) == 1
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("review", 1)
    assert row.last_error is not None and "may have been sent" in row.last_error
    assert (worker.jobs_complete, worker.jobs_retried) == (1, 0)


@pytest.mark.parametrize("provider", ["resend", "sendgrid"])
async def test_the_same_email_enqueued_twice_is_sent_once(
    provider: str,
    arq_redis: ArqRedis,
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    provider_server.default_delay_s = 0.2  # both jobs are in flight together
    kwargs: dict[str, Any] = {
        "to": RECIPIENT,
        "subject": SUBJECT,
        "html": HTML,
        "idempotency_key": "dup-1",
    }
    for job_id in ("first", "second"):  # two arq jobs: arq's own dedup cannot help here
        await arq_redis.enqueue_job("send_email", _queue_name="default", _job_id=job_id, **kwargs)
    await run_burst("default", settings_=job_settings(provider))
    # ...and a third enqueue, through the client, after the message was sent.
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, idempotency_key="dup-1")
    await run_burst("default", settings_=job_settings(provider))

    assert len(provider_server.delivered) == 1
    assert len(provider_server.requests) == 1
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("sent", 1)


async def test_send_email_without_a_key_uses_its_job_id(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    provider_server.script(RESEND_EMAILS, Answer(status=503))
    await arq_redis.enqueue_job(
        "send_email", _queue_name="default", _job_id="j-1", to=RECIPIENT, subject="s", html="h"
    )
    await run_burst("default", settings_=job_settings("resend"))

    first, second = provider_server.requests
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "job/j-1"
    [row] = await outbox_rows(sessions)
    assert (row.idempotency_key, row.status, row.attempts) == ("job/j-1", "sent", 2)


async def test_last_transient_failure_marks_the_row_failed_with_the_reason(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    provider_server.script(SENDGRID_MAIL, *[Answer(status=502)] * 5)
    await jobs_client.send_email(RECIPIENT, SUBJECT, HTML, idempotency_key="k-502")
    worker = await run_burst("default", settings_=job_settings("sendgrid", max_retries=2))

    assert len(provider_server.requests) == 3  # the first try and MAX_RETRIES=2 retries
    [row] = await outbox_rows(sessions)
    assert (row.status, row.attempts) == ("failed", 3)
    assert row.last_error is not None
    assert "gave up after 3 tries" in row.last_error
    assert "502" in row.last_error
    assert worker.jobs_failed == 1


async def test_missing_user_fails_without_sending(
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    missing = uuid.uuid4()
    with pytest.raises(LookupError, match=f"no user {missing}"):
        await jobs_client.send_welcome_email(missing)  # the client renders it: nothing queued
    # A job enqueued some other way for a user who is gone fails the same, sending nothing.
    await arq_redis.enqueue_job("send_welcome_email", _queue_name="default", user_id=str(missing))
    worker = await run_burst("default", settings_=job_settings("resend"))
    assert (worker.jobs_complete, worker.jobs_failed) == (0, 1)
    assert provider_server.requests == []
    async with sessions() as session:
        assert await session.scalar(text("SELECT count(*) FROM email_messages")) == 0

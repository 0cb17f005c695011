"""Provider webhooks from the attacker's side and the provider's: signatures, replays, effects."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import pytest
from arq.connections import ArqRedis
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import EmailEvent, EmailMessage, EmailSuppression
from tests.conftest import RunBurst
from tests.webhooks.signing import (
    RESEND_SECRET,
    SendGridKeys,
    resend_bounce,
    sendgrid_event,
    svix_headers,
)
from worker.client import JobsClient
from worker.email_providers.sendgrid import IDEMPOTENCY_CUSTOM_ARG
from worker.settings import Settings
from worker.web.webhooks import MAX_BODY_BYTES, webhook_routes

Sessions = async_sessionmaker[AsyncSession]
ADDRESS = "Bounced.Person@Example.com"


async def stored(sessions: Sessions) -> tuple[int, list[tuple[str, str, str]]]:
    """(events stored, suppressions as (email, reason, source))."""
    async with sessions() as session:
        events = await session.scalar(select(func.count()).select_from(EmailEvent))
        rows = await session.scalars(select(EmailSuppression).order_by(EmailSuppression.email))
        return int(events or 0), [(r.email, r.reason, r.source) for r in rows]


async def queued(arq_redis: ArqRedis) -> int:
    return int(await arq_redis.zcard("default"))


# -- Resend (Svix) ------------------------------------------------------------------------


async def test_a_signed_resend_bounce_is_stored_then_suppresses_the_address(
    webhooks: httpx.AsyncClient, sessions: Sessions, arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    body = resend_bounce(ADDRESS)
    headers = svix_headers(body, msg_id="msg_bounce_1")
    response = await webhooks.post("/webhooks/resend", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 1, "new": 1}
    # The endpoint only stored and enqueued: nothing is suppressed before the job runs.
    assert await stored(sessions) == (1, [])
    assert await queued(arq_redis) == 1

    worker = await run_burst("default")
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert await stored(sessions) == (
        1,
        [("bounced.person@example.com", "bounce", "resend:msg_bounce_1")],
    )


@pytest.mark.parametrize(
    "tamper",
    ["forged key", "body altered", "old timestamp", "future timestamp", "no signature", "re-id"],
)
async def test_a_resend_webhook_that_is_not_provably_resend_s_is_401_and_stores_nothing(
    tamper: str,
    webhooks: httpx.AsyncClient,
    sessions: Sessions,
    arq_redis: ArqRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = resend_bounce(ADDRESS)
    now = time.time()
    headers = svix_headers(body)
    if tamper == "forged key":
        headers = svix_headers(body, key=b"an attacker's own key, 32 bytes!")
    elif tamper == "body altered":
        body = resend_bounce("someone.else@example.com")  # signed for ADDRESS, sent for another
    elif tamper == "old timestamp":
        headers = svix_headers(body, at_s=now - 301)
    elif tamper == "future timestamp":
        headers = svix_headers(body, at_s=now + 310)
    elif tamper == "no signature":
        del headers["svix-signature"]
    elif tamper == "re-id":
        headers["svix-id"] = "msg_someone_elses"  # the id is part of what is signed
    response = await webhooks.post("/webhooks/resend", content=body, headers=headers)
    assert response.status_code == 401
    assert await stored(sessions) == (0, [])
    assert await queued(arq_redis) == 0
    # The refusal is logged with its reason, never with the secret or a signature.
    assert "resend webhook refused" in caplog.text
    assert RESEND_SECRET.removeprefix("whsec_") not in caplog.text
    for entry in headers.get("svix-signature", "").split():
        assert entry.partition(",")[2] not in caplog.text


async def test_a_replayed_resend_webhook_has_no_second_effect(
    webhooks: httpx.AsyncClient, sessions: Sessions, arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    body = resend_bounce(ADDRESS)
    headers = svix_headers(body, msg_id="msg_replayed")
    first = await webhooks.post("/webhooks/resend", content=body, headers=headers)
    await run_burst("default")
    replay = await webhooks.post("/webhooks/resend", content=body, headers=headers)
    assert (first.json()["new"], replay.json()["new"]) == (1, 0)
    assert replay.status_code == 200  # the provider must stop re-posting it
    assert await queued(arq_redis) == 0
    events, suppressions = await stored(sessions)
    assert (events, len(suppressions)) == (1, 1)


async def test_a_resend_event_stored_but_never_enqueued_is_enqueued_by_the_provider_s_retry(
    webhooks: httpx.AsyncClient, sessions: Sessions, arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    body = resend_bounce(ADDRESS)
    headers = svix_headers(body, msg_id="msg_lost_job")
    await webhooks.post("/webhooks/resend", content=body, headers=headers)
    await arq_redis.delete("default")  # the job is lost (say, the enqueue failed: a 500)
    retry = await webhooks.post("/webhooks/resend", content=body, headers=headers)
    assert retry.json() == {"received": 1, "new": 1}
    await run_burst("default")
    assert await stored(sessions) == (
        1,
        [("bounced.person@example.com", "bounce", "resend:msg_lost_job")],
    )


async def test_resend_events_other_than_bounce_and_complaint_change_nothing(
    webhooks: httpx.AsyncClient, sessions: Sessions, run_burst: RunBurst
) -> None:
    for kind in ("email.delivered", "email.complained"):
        payload = json.loads(resend_bounce(ADDRESS))
        body = json.dumps(payload | {"type": kind}).encode()
        response = await webhooks.post("/webhooks/resend", content=body, headers=svix_headers(body))
        assert response.status_code == 200
    await run_burst("default")
    _, suppressions = await stored(sessions)
    assert [(email, reason) for email, reason, _ in suppressions] == [
        ("bounced.person@example.com", "complaint")
    ]


async def test_a_signed_resend_webhook_that_is_not_an_event_is_400_and_stores_nothing(
    webhooks: httpx.AsyncClient, sessions: Sessions
) -> None:
    for body in (b"not json", b'["a list"]', b'{"type": 5}'):
        response = await webhooks.post("/webhooks/resend", content=body, headers=svix_headers(body))
        assert response.status_code == 400
    assert await stored(sessions) == (0, [])


async def test_a_body_over_the_cap_is_413_before_any_signature_work(
    webhooks: httpx.AsyncClient, sessions: Sessions
) -> None:
    body = b"[" + b" " * MAX_BODY_BYTES + b"]"
    response = await webhooks.post("/webhooks/resend", content=body, headers=svix_headers(body))
    assert response.status_code == 413
    assert await stored(sessions) == (0, [])


async def test_an_unconfigured_provider_answers_503_and_stores_nothing(
    settings: Settings, jobs_client: JobsClient, sessions: Sessions
) -> None:
    from starlette.applications import Starlette

    app = Starlette(routes=webhook_routes(settings, lambda: jobs_client))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://public.test"
    ) as client:
        body = resend_bounce(ADDRESS)
        response = await client.post("/webhooks/resend", content=body, headers=svix_headers(body))
        assert (response.status_code, response.text) == (503, "RESEND_WEBHOOK_SECRET is not set")
        response = await client.post("/webhooks/sendgrid", content=b"[]")
        assert response.status_code == 503
    assert await stored(sessions) == (0, [])


# -- SendGrid (ECDSA) ---------------------------------------------------------------------


async def add_review_row(sessions: Sessions, key: str, to: str) -> None:
    async with sessions.begin() as session:
        session.add(
            EmailMessage(
                idempotency_key=key,
                to_email=to,
                subject="Welcome",
                html="<p>hi</p>",
                status="review",
                provider="sendgrid",
                attempts=1,
                last_error="sendgrid: read timed out",
            )
        )


async def test_sendgrid_events_suppress_bounces_and_complaints_and_resolve_review_rows(
    webhooks: httpx.AsyncClient,
    sendgrid_keys: SendGridKeys,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    reviewed = f"welcome/{uuid.uuid4()}"
    await add_review_row(sessions, reviewed, "Delivered@Example.com")
    bounced_key = f"caller/{uuid.uuid4()}"
    await add_review_row(sessions, bounced_key, "hard@example.com")
    other = f"caller/{uuid.uuid4()}"
    await add_review_row(sessions, other, "other@example.com")
    delivered = sendgrid_event("delivered", "delivered@example.com", c360_idempotency_key=reviewed)
    events = [
        delivered,
        sendgrid_event(
            "bounce", "hard@example.com", type="bounce", c360_idempotency_key=bounced_key
        ),
        sendgrid_event("bounce", "blocked@example.com", type="blocked"),
        sendgrid_event("spamreport", "angry@example.com"),
        sendgrid_event("open", "other@example.com"),
        # A custom arg naming a row of another recipient resolves nothing.
        sendgrid_event("delivered", "mallory@example.com", c360_idempotency_key=other),
    ]
    body = json.dumps(events).encode()
    response = await webhooks.post(
        "/webhooks/sendgrid", content=body, headers=sendgrid_keys.headers(body)
    )
    assert response.json() == {"received": 6, "new": 6}
    await run_burst("default")

    _, suppressions = await stored(sessions)
    assert [(email, reason) for email, reason, _ in suppressions] == [
        ("angry@example.com", "complaint"),
        ("hard@example.com", "bounce"),
    ]
    async with sessions() as session:
        rows = {r.idempotency_key: r for r in await session.scalars(select(EmailMessage))}
    assert (rows[reviewed].status, rows[bounced_key].status, rows[other].status) == (
        "sent",
        "sent",
        "review",
    )
    assert rows[reviewed].provider_message_id == delivered["sg_message_id"].split(".")[0]
    assert rows[reviewed].sent_at is not None
    assert delivered["sg_event_id"] in (rows[reviewed].last_error or "")
    assert IDEMPOTENCY_CUSTOM_ARG == "c360_idempotency_key"  # what the sends carry


@pytest.mark.parametrize(
    "tamper", ["other key pair", "body altered", "re-timestamped", "old", "truncated", "missing"]
)
async def test_a_sendgrid_webhook_that_is_not_provably_sendgrid_s_is_401_and_stores_nothing(
    tamper: str,
    webhooks: httpx.AsyncClient,
    sendgrid_keys: SendGridKeys,
    sessions: Sessions,
    arq_redis: ArqRedis,
) -> None:
    body = json.dumps([sendgrid_event("bounce", ADDRESS, type="bounce")]).encode()
    headers = sendgrid_keys.headers(body)
    sig, stamp = "X-Twilio-Email-Event-Webhook-Signature", "X-Twilio-Email-Event-Webhook-Timestamp"
    if tamper == "other key pair":
        headers = SendGridKeys.generate().headers(body)
    elif tamper == "body altered":
        body = body.replace(b"Bounced.Person", b"Someone.Else")
    elif tamper == "re-timestamped":  # a captured request, its timestamp moved to now
        old = sendgrid_keys.headers(body, at_s=time.time() - 600)
        headers = old | {stamp: str(int(time.time()))}
    elif tamper == "old":
        headers = sendgrid_keys.headers(body, at_s=time.time() - 301)
    elif tamper == "truncated":
        raw = base64.b64decode(headers[sig])
        headers[sig] = base64.b64encode(raw[:-4]).decode()
    elif tamper == "missing":
        del headers[sig]
    response = await webhooks.post("/webhooks/sendgrid", content=body, headers=headers)
    assert response.status_code == 401
    assert await stored(sessions) == (0, [])
    assert await queued(arq_redis) == 0


async def test_a_replayed_sendgrid_batch_stores_each_event_once(
    webhooks: httpx.AsyncClient,
    sendgrid_keys: SendGridKeys,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    events = [sendgrid_event("bounce", ADDRESS, type="bounce"), sendgrid_event("open", ADDRESS)]
    body = json.dumps(events).encode()
    first = await webhooks.post(
        "/webhooks/sendgrid", content=body, headers=sendgrid_keys.headers(body)
    )
    await run_burst("default")
    # SendGrid may post an event again inside a new batch: only the new one is stored.
    again = [*events, sendgrid_event("delivered", ADDRESS)]
    body = json.dumps(again).encode()
    second = await webhooks.post(
        "/webhooks/sendgrid", content=body, headers=sendgrid_keys.headers(body)
    )
    assert (first.json()["new"], second.json()["new"]) == (2, 1)
    await run_burst("default")
    events_stored, suppressions = await stored(sessions)
    assert (events_stored, len(suppressions)) == (3, 1)
    async with sessions() as session:
        unapplied = await session.scalar(
            text("SELECT count(*) FROM email_events WHERE processed_at IS NULL")
        )
    assert unapplied == 0


def test_the_test_signers_check_out_against_the_worker_s_verifiers(
    sendgrid_keys: SendGridKeys,
) -> None:
    """Both sides of the signature agree on a known Svix vector (Svix's own test secret)."""
    from worker.webhook_signatures import BadSignature, svix_key, verify_svix

    # From Svix's docs: this secret, id, timestamp and payload sign to this value.
    key = svix_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    verify_svix(
        key,
        b'{"test": 2432232314}',
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "1614265330",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        now_s=1614265330,
    )
    with pytest.raises(BadSignature):
        verify_svix(
            key,
            b'{"test": 2432232315}',
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            now_s=1614265330,
        )

"""The email providers' webhooks (CONTRACT §13): `POST /webhooks/resend`, `POST /webhooks/sendgrid`.

Each request is checked before anything else happens (worker/webhook_signatures.py): a bad or
missing signature, or a timestamp more than 5 minutes off, answers 401 and stores nothing.
A verified request stores its events (`jobs.email.events.store`: one INSERT, deduplicated by
the provider's event id) and enqueues `process_email_events` for the new ones, then answers
200; the job does the work. So a flood costs one insert per request, and a replay nothing.
A failure to store or enqueue answers 500, and the provider posts the events again later.

`webhook_routes(settings, jobs)` gives the routes for an app that already holds a `JobsClient`
(the public app mounts them); `create_webhooks_app(settings)` is a standalone app that opens
its own client in its lifespan.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from jobs.email.events import IncomingEvent, Provider, resend_event, sendgrid_events, store
from worker.client import JobsClient
from worker.routes import PROCESS_EMAIL_EVENTS, enqueue
from worker.settings import Settings
from worker.webhook_signatures import (
    BadSignature,
    sendgrid_key,
    svix_key,
    verify_sendgrid,
    verify_svix,
)

log = logging.getLogger(__name__)

# Read before the signature is checked, so an anonymous client must not make us buffer an
# unbounded body; a provider whose post is refused with 413 retries, and the cap is far above
# one Resend event or a SendGrid batch.
MAX_BODY_BYTES = 4 * 1024 * 1024
SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

JobsGetter = Callable[[], JobsClient]
Verify = Callable[[Request, bytes], None]
Parse = Callable[[Request, bytes], list[IncomingEvent]]


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the body is not JSON") from None


def _endpoint(
    provider: Provider, setting: str, verify: Verify | None, parse: Parse, jobs: JobsGetter
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if verify is None:
            return PlainTextResponse(f"{setting} is not set", status_code=503)
        try:
            body = await _read_body(request)
        except BodyTooLarge:
            return PlainTextResponse("body too large", status_code=413)
        try:
            verify(request, body)
        except BadSignature as exc:
            # The reason helps whoever set up the webhook; it never holds a secret or signature.
            log.warning("%s webhook refused: %s", provider, exc)
            return PlainTextResponse("invalid signature", status_code=401)
        try:
            events = parse(request, body)
        except ValueError as exc:
            return PlainTextResponse(f"bad event payload: {exc}", status_code=400)
        client = jobs()
        async with client.sessions.begin() as session:
            to_process = await store(session, provider, events)
        # After the commit, so the job always finds its rows; if this enqueue fails the 500
        # makes the provider post again, and `store` hands back the events not yet applied.
        if to_process:
            await enqueue(client.redis, PROCESS_EMAIL_EVENTS, None, event_ids=to_process)
        return JSONResponse({"received": len(events), "new": len(to_process)})

    return endpoint


def _svix_verifier(secret: SecretStr) -> Verify:
    key = svix_key(secret.get_secret_value())

    def verify(request: Request, body: bytes) -> None:
        headers = request.headers
        verify_svix(
            key,
            body,
            headers.get("svix-id"),
            headers.get("svix-timestamp"),
            headers.get("svix-signature"),
        )

    return verify


def _sendgrid_verifier(public_key_b64: str) -> Verify:
    public_key = sendgrid_key(public_key_b64)

    def verify(request: Request, body: bytes) -> None:
        headers = request.headers
        verify_sendgrid(
            public_key,
            body,
            headers.get(SENDGRID_SIGNATURE_HEADER),
            headers.get(SENDGRID_TIMESTAMP_HEADER),
        )

    return verify


def webhook_routes(settings: Settings, jobs: JobsGetter) -> list[BaseRoute]:
    """`POST /webhooks/resend` and `POST /webhooks/sendgrid`, storing through `jobs()`.

    A provider whose setting is unset answers 503 (and stores nothing).
    """
    secret, public_key = settings.resend_webhook_secret, settings.sendgrid_webhook_public_key
    resend_verify = _svix_verifier(secret) if secret is not None else None
    sendgrid_verify = _sendgrid_verifier(public_key) if public_key is not None else None

    def parse_resend(request: Request, body: bytes) -> list[IncomingEvent]:
        # svix-id is present: the signature over it was checked.
        return [resend_event(request.headers["svix-id"], _json(body))]

    def parse_sendgrid(request: Request, body: bytes) -> list[IncomingEvent]:
        return sendgrid_events(_json(body))

    resend = _endpoint("resend", "RESEND_WEBHOOK_SECRET", resend_verify, parse_resend, jobs)
    sendgrid = _endpoint(
        "sendgrid", "SENDGRID_WEBHOOK_PUBLIC_KEY", sendgrid_verify, parse_sendgrid, jobs
    )
    return [
        Route("/webhooks/resend", resend, methods=["POST"]),
        Route("/webhooks/sendgrid", sendgrid, methods=["POST"]),
    ]


def create_webhooks_app(settings: Settings) -> Starlette:
    """The webhook routes as an app of their own, with a `JobsClient` opened in its lifespan."""
    holder: list[JobsClient] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with JobsClient.from_settings(settings) as client:
            holder.append(client)
            try:
                yield
            finally:
                holder.clear()

    def jobs() -> JobsClient:
        assert holder, "the webhooks app's lifespan has not started"
        return holder[0]

    return Starlette(routes=webhook_routes(settings, jobs), lifespan=lifespan)

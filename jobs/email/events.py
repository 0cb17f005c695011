"""Provider webhook events: stored once by the webhook endpoint, applied by a job.

The endpoint (worker/web/webhooks.py) only checks the signature, calls `store` (one INSERT for
the whole request, deduplicated on (provider, event id)) and enqueues `process_email_events`
with the ids it stored, so a flood of webhooks costs one insert each and a replay costs none.
The job applies each event in its own transaction, which also sets `processed_at`, so a job
run twice (arq runs jobs at least once) or two jobs holding the same id apply it once:

- a bounce (Resend `email.bounced`, which Resend sends for permanent rejections only; SendGrid
  `bounce` unless its `type` is `blocked`, a refusal that may pass later) suppresses the
  address for all email; a complaint (Resend `email.complained`, SendGrid `spamreport`) too;
- a SendGrid `delivered` or `bounce` event names our outbox key in its custom args (SendGrid
  copies `custom_args` into every event as top-level fields:
  https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event) and resolves that
  row from `review` to `sent`: the provider did take the message we could not confirm;
- anything else is kept as received, and ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import EmailEvent
from jobs.email.suppression import Reason, suppress
from worker.context import Ctx
from worker.email_providers.sendgrid import IDEMPOTENCY_CUSTOM_ARG
from worker.job import job

log = logging.getLogger(__name__)

Provider = Literal["resend", "sendgrid"]
PROCESS_TIME_CAP_S = 120.0

_RESEND_SUPPRESSES: dict[str, Reason] = {
    "email.bounced": "bounce",
    "email.complained": "complaint",
}
_SENDGRID_RESOLVES_REVIEW = ("delivered", "bounce")

_RESOLVE_REVIEW = text("""
    UPDATE email_messages
    SET status = 'sent', sent_at = coalesce(sent_at, now()), updated_at = now(),
        provider_message_id = coalesce(provider_message_id, :message_id),
        last_error = :note
    WHERE idempotency_key = :key AND status = 'review' AND provider = 'sendgrid'
      AND lower(trim(to_email)) = lower(trim(:email))
    RETURNING id
""")


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """One event of a verified webhook request, as it will be stored."""

    event_id: str
    event_type: str
    payload: dict[str, Any]


def resend_event(svix_id: str, body: Any) -> IncomingEvent:
    """The one event of a Resend webhook (`{"type": ..., "data": {...}}`); `ValueError` if not."""
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        raise ValueError("a Resend event is a JSON object with a string `type`")
    return IncomingEvent(svix_id, body["type"], body)


def sendgrid_events(body: Any) -> list[IncomingEvent]:
    """The events of a SendGrid webhook (a JSON array of objects with `event`); or `ValueError`."""
    if not isinstance(body, list) or not all(
        isinstance(e, dict) and isinstance(e.get("event"), str) for e in body
    ):
        raise ValueError("a SendGrid webhook is a JSON array of objects with a string `event`")
    events = []
    for event in body:
        event_id = event.get("sg_event_id")
        if not isinstance(event_id, str) or not event_id:
            # Still deduplicated: the same event re-posted hashes to the same id.
            digest = hashlib.sha256(json.dumps(event, sort_keys=True).encode()).hexdigest()
            event_id = f"sha256:{digest}"
        events.append(IncomingEvent(event_id, event["event"], event))
    return events


async def store(
    session: AsyncSession, provider: Provider, events: Sequence[IncomingEvent]
) -> list[str]:
    """Insert the events not stored yet; the ids of those still to process (new or unapplied).

    An event stored before but not applied yet (its job was lost, or the first request's
    enqueue failed and the provider posted again) is returned too, so it gets a job again;
    an applied one is not, so a replay has no effect.
    """
    if not events:
        return []
    rows = [
        {"provider": provider, "event_id": e.event_id, "event_type": e.event_type}
        | {"payload": e.payload}
        for e in events
    ]
    inserted = await session.scalars(
        pg_insert(EmailEvent)
        .values(rows)
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(EmailEvent.id)
    )
    ids = [str(event_id) for event_id in inserted]
    if len(ids) < len(events):
        pending = await session.scalars(
            select(EmailEvent.id).where(
                EmailEvent.provider == provider,
                EmailEvent.event_id.in_([e.event_id for e in events]),
                EmailEvent.processed_at.is_(None),
                EmailEvent.id.not_in([uuid.UUID(i) for i in ids]),
            )
        )
        ids += [str(event_id) for event_id in pending]
    return ids


def _addresses(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [a for a in value if isinstance(a, str)]
    return []


async def _suppress_each(
    session: AsyncSession, addresses: list[str], reason: Reason, source: str
) -> int:
    done = 0
    for address in addresses:
        try:
            await suppress(session, address, reason, source)
            done += 1
        except ValueError as exc:  # signed by the provider, yet not an address: keep the rest
            log.warning("email event %s: %s", source, exc)
    return done


async def _apply_resend(session: AsyncSession, event: EmailEvent) -> str:
    reason = _RESEND_SUPPRESSES.get(event.event_type)
    if reason is None:
        return "ignored"
    data = event.payload.get("data")
    to = _addresses(data.get("to") if isinstance(data, dict) else None)
    suppressed = await _suppress_each(session, to, reason, f"resend:{event.event_id}")
    return "suppressed" if suppressed else "ignored"


async def _apply_sendgrid(session: AsyncSession, event: EmailEvent) -> str:
    payload, kind = event.payload, event.event_type
    outcome = "ignored"
    email = payload.get("email")
    key = payload.get(IDEMPOTENCY_CUSTOM_ARG)
    if kind in _SENDGRID_RESOLVES_REVIEW and isinstance(key, str) and isinstance(email, str):
        message_id = payload.get("sg_message_id")
        # `sg_message_id` is the X-Message-Id the send answered, then `.filter...`.
        params = {
            "key": key,
            "email": email,
            "message_id": message_id.split(".")[0] if isinstance(message_id, str) else None,
            "note": f"resolved by SendGrid's {kind} event {event.event_id}",
        }
        if (await session.execute(_RESOLVE_REVIEW, params)).first() is not None:
            log.info("email %s: review resolved to sent by SendGrid's %s event", key, kind)
            outcome = "resolved"
    reason: Reason | None = None
    if kind == "bounce" and payload.get("type") != "blocked":
        reason = "bounce"
    elif kind == "spamreport":
        reason = "complaint"
    if reason is not None:
        source = f"sendgrid:{event.event_id}"
        if await _suppress_each(session, _addresses(email), reason, source):
            outcome = "suppressed" if outcome == "ignored" else f"{outcome}+suppressed"
    return outcome


@job(timeout_cap_s=PROCESS_TIME_CAP_S)
async def process_email_events(ctx: Ctx, event_ids: list[str]) -> dict[str, Any]:
    """Apply stored webhook events; each once, whatever runs it again.

    Each event is locked, applied and marked `processed_at` in one transaction; one already
    applied, or being applied by another job right now (SKIP LOCKED), is counted and skipped.
    """
    counts: Counter[str] = Counter()
    for event_id in event_ids:
        async with ctx["sessions"].begin() as session:
            event = await session.scalar(
                select(EmailEvent)
                .where(EmailEvent.id == uuid.UUID(event_id), EmailEvent.processed_at.is_(None))
                .with_for_update(skip_locked=True)
            )
            if event is None:
                counts["skipped"] += 1
                continue
            if event.provider == "resend":
                counts[await _apply_resend(session, event)] += 1
            else:
                counts[await _apply_sendgrid(session, event)] += 1
            await session.execute(
                update(EmailEvent).where(EmailEvent.id == event.id).values(processed_at=func.now())
            )
    return dict(counts)

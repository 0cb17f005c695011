"""The outbox's claim and settle statements for a batch of messages (one transaction each).

A flush of the batcher (jobs/email/batcher.py) claims all its messages in one transaction:

- new messages are inserted already claimed (`sending`, `attempts = 1`) in one statement that
  also checks the suppression list for each of them (`suppressed` instead, never sent);
- existing ones are locked in one statement, in id order (two flushes never deadlock), with
  every other member of a batch one of them is `sending` in;
- a `pending` one joins the new batch; a settled one answers at once (its `after` runs here);
- when the request has room, due `pending` one-off rows (`caller/`, `job/`, `welcome/`: the
  client's, written at enqueue) that nobody is claiming join it too, oldest first (`sweep`), so
  a burst of 10,000 needs ~100 requests, not 10,000 running jobs; their own jobs then find them
  settled (`read_settled`) and return at once, nothing sent;
- a `sending` one whose claimer is still at it (younger than SEND_LEASE_S, and its process
  alive with that batch in flight) is retried later; otherwise its whole batch is taken over
  and resent as stored (same members, same body, same key) where the provider deduplicates,
  or goes to `review` where it cannot (SendGrid).

Every claimed row records its batch (`batch_id`) and the claiming process (`claimed_by`). A
`Unit` is one provider request: every stored member of one batch, ordered by id; the request's
key is the member's own for a batch of one (`POST /emails`), `batch/<batch_id>` otherwise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from jobs.email.keys import REDRIVEN_PREFIXES
from jobs.email.suppression import CAMPAIGN_KEY_PREFIXES, is_campaign, suppressed_sql

SEND_LEASE_S = 120.0
SETTLED = ("sent", "failed", "review", "suppressed")
SUPPRESSED_DETAIL = "not sent: the recipient is on the suppression list"
BATCH_KEY_PREFIX = "batch/"

_INSERT_CLAIMED = text(f"""
    INSERT INTO email_messages
        (idempotency_key, to_email, subject, html, text, headers, status, attempts, provider,
         updated_at, last_error, batch_id, claimed_by)
    SELECT d.key, d.to_email, d.subject, d.html, d.body_text, CAST(d.headers AS jsonb),
           CASE WHEN d.suppressed THEN 'suppressed' ELSE 'sending' END,
           CASE WHEN d.suppressed THEN 0 ELSE 1 END, :provider, now(),
           CASE WHEN d.suppressed THEN CAST(:suppressed_detail AS text) END,
           CASE WHEN d.suppressed THEN NULL ELSE CAST(:batch_id AS uuid) END,
           CASE WHEN d.suppressed THEN NULL ELSE CAST(:worker AS text) END
    FROM (SELECT u.*, {suppressed_sql("u.to_email", "u.campaign")} AS suppressed
          FROM unnest(CAST(:keys AS text[]), CAST(:tos AS text[]), CAST(:subjects AS text[]),
                      CAST(:htmls AS text[]), CAST(:texts AS text[]),
                      CAST(:headers AS text[]), CAST(:campaigns AS boolean[]))
               AS u(key, to_email, subject, html, body_text, headers, campaign)) AS d
    ORDER BY d.key
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id, idempotency_key, status
""")
_CAMPAIGN_SQL = " OR ".join(
    f"m.idempotency_key LIKE '{prefix}%'" for prefix in CAMPAIGN_KEY_PREFIXES
)
# The rows asked for, and every member of a batch one of them is `sending` in, locked in one
# statement in id order: flushes that meet on the same rows wait for each other, never deadlock.
_LOCK_EXISTING = text(f"""
    SELECT m.id, m.idempotency_key AS key, m.status, m.attempts, m.provider_message_id,
           m.last_error, m.batch_id, m.claimed_by,
           extract(epoch FROM now() - m.updated_at) AS claim_age_s,
           {suppressed_sql("m.to_email", f"({_CAMPAIGN_SQL})")} AS suppressed
    FROM email_messages m
    WHERE m.idempotency_key = ANY(CAST(:keys AS text[]))
       OR m.batch_id IN (SELECT batch_id FROM email_messages
                         WHERE idempotency_key = ANY(CAST(:keys AS text[]))
                           AND status = 'sending' AND batch_id IS NOT NULL)
    ORDER BY m.id
    FOR UPDATE OF m
""")
_ONE_OFF_SQL = " OR ".join(f"m.idempotency_key LIKE '{prefix}%'" for prefix in REDRIVEN_PREFIXES)
# Room left in a request: the oldest due one-off rows nobody holds (SKIP LOCKED: another
# flush's claim has them), claimed into the batch, or `suppressed` as at any claim. Campaign
# and trial rows never: their `after` hooks must run with their settle, and only their own
# tick holds them. The partial index ix_email_messages_open serves the order.
_SWEEP = text(f"""
    WITH picked AS (
        SELECT m.id, {suppressed_sql("m.to_email", "false")} AS suppressed
        FROM email_messages m
        WHERE m.status = 'pending' AND ({_ONE_OFF_SQL})
          AND m.idempotency_key <> ALL(CAST(:exclude AS text[]))
        ORDER BY m.created_at, m.id
        LIMIT :room
        FOR UPDATE OF m SKIP LOCKED
    )
    UPDATE email_messages m
    SET status = CASE WHEN p.suppressed THEN 'suppressed' ELSE 'sending' END,
        attempts = m.attempts + CASE WHEN p.suppressed THEN 0 ELSE 1 END,
        last_error = CASE WHEN p.suppressed THEN CAST(:suppressed_detail AS text)
                          ELSE m.last_error END,
        provider = :provider, updated_at = now(),
        batch_id = CASE WHEN p.suppressed THEN m.batch_id ELSE CAST(:batch_id AS uuid) END,
        claimed_by = CASE WHEN p.suppressed THEN NULL ELSE CAST(:worker AS text) END
    FROM picked p
    WHERE m.id = p.id
    RETURNING m.idempotency_key, m.status
""")
_READ_ROW = text("""
    SELECT m.id, m.idempotency_key AS key, m.status, m.attempts, m.provider_message_id,
           m.last_error, m.batch_id, m.claimed_by,
           extract(epoch FROM now() - m.updated_at) AS claim_age_s, false AS suppressed
    FROM email_messages m WHERE m.idempotency_key = :key
""")
_CLAIM_PENDING = text("""
    UPDATE email_messages
    SET status = 'sending', attempts = attempts + 1, provider = :provider, updated_at = now(),
        batch_id = CAST(:batch_id AS uuid), claimed_by = :worker
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'pending'
""")
# Taking over a batch: its members still `sending` count one more attempt, under this process.
_RECLAIM = text("""
    UPDATE email_messages
    SET attempts = attempts + 1, provider = :provider, updated_at = now(), claimed_by = :worker,
        batch_id = CAST(:batch_id AS uuid)
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'sending'
""")
_MARK = text("""
    UPDATE email_messages
    SET status = :status, last_error = :error, updated_at = now(), claimed_by = NULL
    WHERE id = ANY(CAST(:ids AS uuid[]))
""")
_UNIT_ROWS = text("""
    SELECT id, idempotency_key AS key, to_email, subject, html, text AS body_text, headers,
           attempts, status
    FROM email_messages WHERE batch_id = CAST(:batch_id AS uuid) ORDER BY id
""")
# One statement settles a whole batch. Only rows this process still holds are written (a row
# another process took over after the lease is theirs), except that a `sent` answer is the
# truth whatever a giving-up job wrote meanwhile (`review`).
_SETTLE = text("""
    UPDATE email_messages m
    SET status = v.status, last_error = v.error, updated_at = now(),
        provider_message_id = coalesce(v.message_id, m.provider_message_id),
        sent_at = CASE WHEN v.status = 'sent' THEN now() ELSE m.sent_at END,
        attempts = greatest(m.attempts + v.delta, 0), claimed_by = NULL
    FROM unnest(CAST(:ids AS uuid[]), CAST(:statuses AS text[]), CAST(:errors AS text[]),
                CAST(:message_ids AS text[]), CAST(:deltas AS integer[]))
         AS v(id, status, error, message_id, delta)
    WHERE m.id = v.id
      AND ((m.status = 'sending' AND m.claimed_by = :worker)
           OR (v.status = 'sent' AND m.status NOT IN ('sent', 'suppressed')))
""")


@dataclass(frozen=True, slots=True)
class Member:
    """One stored row of a batch: what the provider gets, built from the row alone."""

    id: uuid.UUID
    key: str
    to: str
    subject: str
    html: str
    text: str | None
    headers: dict[str, str]
    attempts: int
    status: str


@dataclass(slots=True)
class Unit:
    """One provider request: every stored member of batch `batch_id`, ordered by id.

    `held` are the members this flush claimed (`sending` under this process). `fresh`: the
    first request of this composition, so a failure that proves nothing was sent may put its
    members back to `pending` (to join any later batch); after a request that may have been
    accepted, only the same composition under the same key may go again.
    """

    batch_id: uuid.UUID
    members: list[Member]
    held: set[uuid.UUID]
    fresh: bool
    # Why it got no send slot (a bounded wait ran out, or sending halted): it is released.
    refused: BaseException | None = None

    @property
    def key(self) -> str:
        """The request's `Idempotency-Key`: a message's own key when it goes alone."""
        if len(self.members) == 1:
            return self.members[0].key
        return f"{BATCH_KEY_PREFIX}{self.batch_id}"


@dataclass(frozen=True, slots=True)
class Found:
    """An existing row as the lock statement read it."""

    id: uuid.UUID
    key: str
    status: str
    attempts: int
    provider_message_id: str | None
    last_error: str | None
    batch_id: uuid.UUID | None
    claimed_by: str | None
    claim_age_s: float
    suppressed: bool


@dataclass(slots=True)
class ClaimPlan:
    """What the claim found for the keys asked for (filled in by `claim`)."""

    inserted: dict[str, tuple[uuid.UUID, str]] = field(default_factory=dict)  # key: id, status
    found: dict[str, Found] = field(default_factory=dict)
    batch_rows: dict[uuid.UUID, list[Found]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewMessage:
    key: str
    to: str
    subject: str
    html: str
    text: str | None
    headers: dict[str, str]


async def insert_claimed(
    session: AsyncSession,
    messages: Sequence[NewMessage],
    *,
    batch_id: uuid.UUID,
    provider: str,
    worker: str,
) -> dict[str, tuple[uuid.UUID, str]]:
    """Insert the messages not stored yet, claimed (or `suppressed`); key -> (id, status)."""
    if not messages:
        return {}
    params: dict[str, Any] = {
        "keys": [m.key for m in messages],
        "tos": [m.to for m in messages],
        "subjects": [m.subject for m in messages],
        "htmls": [m.html for m in messages],
        "texts": [m.text for m in messages],
        "headers": [json.dumps(m.headers) if m.headers else None for m in messages],
        "campaigns": [is_campaign(m.key) for m in messages],
        "provider": provider,
        "suppressed_detail": SUPPRESSED_DETAIL,
        "batch_id": batch_id,
        "worker": worker,
    }
    rows = (await session.execute(_INSERT_CLAIMED, params)).all()
    return {row.idempotency_key: (row.id, row.status) for row in rows}


async def lock_existing(session: AsyncSession, keys: Sequence[str]) -> list[Found]:
    if not keys:
        return []
    rows = (await session.execute(_LOCK_EXISTING, {"keys": list(keys)})).all()
    return [_found(r) for r in rows]


def _found(r: Any) -> Found:
    return Found(
        r.id,
        r.key,
        r.status,
        r.attempts,
        r.provider_message_id,
        r.last_error,
        r.batch_id,
        r.claimed_by,
        float(r.claim_age_s),
        bool(r.suppressed),
    )


async def sweep(
    session: AsyncSession,
    room: int,
    *,
    exclude: Sequence[str],
    batch_id: uuid.UUID,
    provider: str,
    worker: str,
) -> dict[str, str]:
    """Claim up to `room` due one-off rows into batch `batch_id`; key -> status (`sending`,
    or `suppressed`). `exclude`: keys this process is about to claim for their own jobs."""
    if room <= 0:
        return {}
    params: dict[str, Any] = {
        "room": room,
        "exclude": list(exclude),
        "suppressed_detail": SUPPRESSED_DETAIL,
        "batch_id": batch_id,
        "provider": provider,
        "worker": worker,
    }
    rows = (await session.execute(_SWEEP, params)).all()
    return {row.idempotency_key: row.status for row in rows}


async def read_row(session: AsyncSession, key: str) -> Found | None:
    """Row `key` as it stands, unlocked (`suppressed` not checked); None if not stored."""
    rows = (await session.execute(_READ_ROW, {"key": key})).all()
    return _found(rows[0]) if rows else None


async def claim_pending(
    session: AsyncSession,
    ids: Sequence[uuid.UUID],
    *,
    batch_id: uuid.UUID,
    provider: str,
    worker: str,
) -> None:
    if ids:
        params = {"ids": list(ids), "batch_id": batch_id, "provider": provider, "worker": worker}
        await session.execute(_CLAIM_PENDING, params)


async def reclaim(
    session: AsyncSession,
    ids: Sequence[uuid.UUID],
    *,
    batch_id: uuid.UUID,
    provider: str,
    worker: str,
) -> None:
    params = {"ids": list(ids), "batch_id": batch_id, "provider": provider, "worker": worker}
    await session.execute(_RECLAIM, params)


async def mark(session: AsyncSession, ids: Sequence[uuid.UUID], status: str, error: str) -> None:
    """Settle rows found at the claim (`suppressed`, or `review` where no resend is safe)."""
    if ids:
        await session.execute(_MARK, {"ids": list(ids), "status": status, "error": error})


async def unit_rows(session: AsyncSession, batch_id: uuid.UUID) -> list[Member]:
    rows = (await session.execute(_UNIT_ROWS, {"batch_id": batch_id})).all()
    return [
        Member(
            r.id,
            r.key,
            r.to_email,
            r.subject,
            r.html,
            r.body_text,
            dict(r.headers or {}),
            r.attempts,
            r.status,
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Verdict:
    """How one held member settles: `delta` -1 gives the claim's attempt back (429, refusal)."""

    status: str  # sent | failed | review | pending | sending (kept in its batch)
    error: str | None = None
    message_id: str | None = None
    delta: int = 0


async def settle(session: AsyncSession, verdicts: dict[uuid.UUID, Verdict], *, worker: str) -> None:
    """Write every verdict in one statement."""
    if not verdicts:
        return
    ids = list(verdicts)
    params: dict[str, Any] = {
        "ids": ids,
        "statuses": [verdicts[i].status for i in ids],
        "errors": [verdicts[i].error for i in ids],
        "message_ids": [verdicts[i].message_id for i in ids],
        "deltas": [verdicts[i].delta for i in ids],
        "worker": worker,
    }
    await session.execute(_SETTLE, params)


# Runs in a claim's or a settle's transaction (jobs/email/outbox.py AfterSettled).
Hook = Callable[[AsyncSession], Awaitable[None]]

"""Which addresses get no email, and which email a suppression stops (CONTRACT §13).

A `bounce`, `complaint` or `manual` entry stops all email to the address; an `unsubscribe`
entry stops campaign email only, so a person who left the waitlist campaign still gets the
password reset or trial notice they need. Which email is campaign email is decided here, by
its outbox key, and nowhere else: the outbox claim asks `suppressed_sql` with `is_campaign`.

Addresses are stored lower-cased (the table's CHECK), and compared as `lower(trim(...))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import delete, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import SUPPRESSION_REASONS, EmailSuppression
from jobs.imports.validate import email_problem

# The same values as db.models.SUPPRESSION_REASONS (the table's CHECK); a test holds them equal.
Reason = Literal["bounce", "complaint", "unsubscribe", "manual"]
# Reasons that stop campaign email only; every other reason stops all email.
CAMPAIGN_ONLY_REASONS: tuple[Reason, ...] = ("unsubscribe",)
_CAMPAIGN_ONLY_SQL = ", ".join(f"'{reason}'" for reason in CAMPAIGN_ONLY_REASONS)
# Outbox keys of campaign (subscription) email: the waitlist steps, `waitlist/<entry>/<step>`,
# and the sign-up confirmation (an unsubscribed address gets neither)
# (jobs/email/drafts.py). Welcome, trial, caller (`caller/`) and `job/` keys are transactional.
CAMPAIGN_KEY_PREFIXES = ("waitlist/", "waitlist-confirm/")

# An entry is only ever widened by a new reason: an `unsubscribe` becomes a `bounce`, but a
# bounced address that also unsubscribes stays suppressed for everything.
_UPSERT = text(f"""
    INSERT INTO email_suppressions (email, reason, source)
    VALUES (lower(trim(:email)), :reason, :source)
    ON CONFLICT (email) DO UPDATE
    SET reason = excluded.reason, source = excluded.source, created_at = now()
    WHERE email_suppressions.reason IN ({_CAMPAIGN_ONLY_SQL})
      AND excluded.reason NOT IN ({_CAMPAIGN_ONLY_SQL})
""")


def is_campaign(key: str) -> bool:
    """Whether the outbox row `key` is campaign email (an unsubscribe stops it)."""
    return key.startswith(CAMPAIGN_KEY_PREFIXES)


def suppressed_sql(address: str, campaign: str) -> str:
    """SQL that is true when the address expression `address` must not get this email.

    `campaign` is a boolean SQL expression (a bound parameter fed by `is_campaign`). One index
    lookup on the primary key, so the claim can run it inside its own statement.
    """
    return (
        "EXISTS (SELECT 1 FROM email_suppressions s "
        f"WHERE s.email = lower(trim({address})) "
        f"AND (s.reason NOT IN ({_CAMPAIGN_ONLY_SQL}) OR {campaign}))"
    )


@dataclass(frozen=True, slots=True)
class Suppression:
    email: str
    reason: str
    source: str
    created_at: datetime


def _check(email: str, reason: str) -> None:
    if reason not in SUPPRESSION_REASONS:
        raise ValueError(
            f"suppression reason must be one of {', '.join(SUPPRESSION_REASONS)}, got {reason!r}"
        )
    problem = email_problem(email.strip() if isinstance(email, str) else None)
    if problem is not None:
        raise ValueError(f"cannot suppress {email!r}: {problem.removeprefix('email: ')}")


async def suppress(session: AsyncSession, email: str, reason: Reason, source: str) -> None:
    """Record that `email` must not get (campaign) email; idempotent, widening only.

    Runs in the caller's transaction, so the suppression commits with whatever caused it (the
    processed webhook event, the unsubscribe). `ValueError` for an unknown reason or a value
    that is not an address.
    """
    _check(email, reason)
    await session.execute(_UPSERT, {"email": email, "reason": reason, "source": source})


async def unsuppress(session: AsyncSession, email: str) -> bool:
    """Remove the address's entry; False when there was none."""
    result = await session.execute(
        delete(EmailSuppression)
        .where(EmailSuppression.email == email.strip().lower())
        .returning(EmailSuppression.email)
    )
    return result.first() is not None


async def list_suppressions(
    session: AsyncSession, *, reason: str | None = None, limit: int = 100
) -> Sequence[Suppression]:
    """The newest entries first, optionally of one reason."""
    query = select(EmailSuppression).order_by(
        EmailSuppression.created_at.desc(), EmailSuppression.email
    )
    if reason is not None:
        query = query.where(EmailSuppression.reason == reason)
    rows = await session.scalars(query.limit(limit))
    return [Suppression(r.email, r.reason, r.source, r.created_at) for r in rows]

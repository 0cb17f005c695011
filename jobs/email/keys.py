"""Outbox keys of the one-off emails and the arq job that sends each: one place for the client,
the jobs and the reconciler.

A caller's `idempotency_key` lives in its own namespace, `caller/<key>`, so no caller can name a
platform email (`welcome/`, `waitlist/`, `trial-reminder/`, `trial-expired/`, `job/`): a
`send_email` keyed `trial-expired/<user_id>` is the row `caller/trial-expired/<user_id>` and
can neither settle nor fail the real notice. The arq job id stays the caller's own key
(`email:<key>`, worker/routes.py), so arq still refuses a duplicate enqueue while the job exists.

The client writes these emails to the outbox (`pending`) before it enqueues them, and
`send_job` turns such a row back into the job that sends it, so the reconciler can re-enqueue
one that Redis lost. Campaign steps and trial notices need no job of their own: their crons
select whatever is still due.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.routes import SEND_EMAIL, SEND_WELCOME_EMAIL, Route, caller_email_job_id, welcome_job_id

if TYPE_CHECKING:  # the outbox's claims read this module's prefixes
    from jobs.email.outbox import Draft

CALLER_PREFIX = "caller/"
JOB_PREFIX = "job/"
WELCOME_PREFIX = "welcome/"
# The rows the reconciler re-drives (worker/reconcile.py).
REDRIVEN_PREFIXES = (CALLER_PREFIX, JOB_PREFIX, WELCOME_PREFIX)


def caller_key(idempotency_key: str) -> str:
    return CALLER_PREFIX + idempotency_key


def job_key(arq_job_id: str) -> str:
    """A `send_email` without a key: every retry of one arq job shares its row."""
    return JOB_PREFIX + arq_job_id


def welcome_key(user_id: uuid.UUID | str) -> str:
    return f"{WELCOME_PREFIX}{uuid.UUID(str(user_id))}"


@dataclass(frozen=True, slots=True)
class SendJob:
    """How the client enqueues the email of one outbox row (CONTRACT §5 names and arguments)."""

    route: Route
    arq_job_id: str
    kwargs: dict[str, Any]


def job_of_key(key: str) -> tuple[Route, str] | None:
    """`(route, arq job id)` of the job that sends outbox row `key`; None for cron keys."""
    if key.startswith(CALLER_PREFIX):
        return SEND_EMAIL, caller_email_job_id(key.removeprefix(CALLER_PREFIX))
    if key.startswith(JOB_PREFIX):
        return SEND_EMAIL, key.removeprefix(JOB_PREFIX)
    if key.startswith(WELCOME_PREFIX):
        return SEND_WELCOME_EMAIL, welcome_job_id(key.removeprefix(WELCOME_PREFIX))
    return None


def send_job(draft: Draft) -> SendJob | None:
    """The job that sends `draft`, with the arguments the client gives it; None for cron keys."""
    target = job_of_key(draft.key)
    if target is None:
        return None
    route, arq_job_id = target
    if route is SEND_WELCOME_EMAIL:
        return SendJob(route, arq_job_id, {"user_id": draft.key.removeprefix(WELCOME_PREFIX)})
    caller = draft.key.removeprefix(CALLER_PREFIX) if draft.key.startswith(CALLER_PREFIX) else None
    kwargs = {"to": draft.to, "subject": draft.subject, "html": draft.html, "text": draft.text}
    return SendJob(route, arq_job_id, kwargs | {"idempotency_key": caller})

"""The route table: every job's name (CONTRACT §5), its queue, and the shape of its arq job id.

The client, the reconciler and the import's continuation enqueue through `enqueue(route, ...)`,
and `tests/foundation/test_routes.py` checks the table against what each queue's worker
registers, so a job's name or queue is written here and nowhere else.

Job ids are deterministic where a row stands behind the job, so that arq refuses a duplicate
enqueue while the job exists, and so that the reconciler can tell from PostgreSQL alone which
job Redis should know. `row_of_job_id` reads such an id back to the import or export row it
names (owner checks, and the console's links from a job to its row).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal, get_args

from arq.connections import ArqRedis
from arq.jobs import Job

from db.models import ExportKind
from worker.tracing import enqueue_span

QueueName = Literal["imports", "exports", "default"]
QUEUES: tuple[QueueName, ...] = get_args(QueueName)

RowKind = Literal["import", "export"]

# How long the pointer to an import's continuation lives; far beyond any import's run time.
CONTINUATION_POINTER_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class JobIdFormat:
    """Deterministic arq job ids `<prefix>:<key>`; `row`: the table row a key names, if any."""

    prefix: str
    row: RowKind | None = None
    # A UUID key must be spelt as `str(uuid)` spells it: one row, one id.
    uuid_key: bool = True

    def build(self, key: uuid.UUID | str) -> str:
        return f"{self.prefix}:{key}"

    def key_of(self, job_id: str) -> str | None:
        """The key `build` made `job_id` from, or None for an id `build` does not make."""
        head, colon, key = job_id.partition(":")
        if head != self.prefix or not colon or not key:
            return None
        if not self.uuid_key:
            return key
        try:
            return key if str(uuid.UUID(key)) == key else None
        except ValueError:
            return None


IMPORT_JOB_IDS = JobIdFormat("import", row="import")
EXPORT_JOB_IDS = JobIdFormat("export", row="export")
# A caller's own `idempotency_key` (jobs/email/keys.py); a `send_email` without one gets a
# random id, as arq would give it, chosen by the client so that its outbox row can name it.
CALLER_EMAIL_JOB_IDS = JobIdFormat("email", uuid_key=False)
WELCOME_JOB_IDS = JobIdFormat("welcome")  # the user's id
WAITLIST_JOB_IDS = JobIdFormat("waitlist")  # the waitlist entry's id


@dataclass(frozen=True, slots=True)
class Route:
    """One job: the name arq registers it under, its queue, and its job ids (None: arq's own)."""

    name: str
    queue: QueueName
    job_ids: JobIdFormat | None = None
    # The default worker also enqueues it on a schedule (arq's cron: ids `cron:<name>:<ms>`).
    cron: bool = False


PROCESS_CONTACTS_IMPORT = Route("process_contacts_import", "imports", IMPORT_JOB_IDS)
GENERATE_CONTACT_EXPORT = Route("generate_contact_export", "exports", EXPORT_JOB_IDS)
GENERATE_COMPANY_EXPORT = Route("generate_company_export", "exports", EXPORT_JOB_IDS)
SEND_EMAIL = Route("send_email", "default", CALLER_EMAIL_JOB_IDS)
SEND_WELCOME_EMAIL = Route("send_welcome_email", "default", WELCOME_JOB_IDS)
KICKOFF_WAITLIST_FIRST_EMAIL = Route("kickoff_waitlist_first_email", "default", WAITLIST_JOB_IDS)
SEND_WAITLIST_CAMPAIGN_HOURLY = Route("send_waitlist_campaign_hourly", "default", cron=True)
CHECK_TRIAL_EXPIRATIONS = Route("check_trial_expirations", "default", cron=True)
SYNC_CONTACT = Route("sync_contact", "default")
SYNC_ALL_CONTACTS = Route("sync_all_contacts", "default", cron=True)
RECONCILE_JOBS = Route("reconcile_jobs", "default", cron=True)
# Enqueued by the provider webhooks (worker/web/webhooks.py) with the events a request stored;
# arq's own ids: the events are deduplicated in PostgreSQL, not by the job id.
PROCESS_EMAIL_EVENTS = Route("process_email_events", "default")

ROUTES: tuple[Route, ...] = (
    PROCESS_CONTACTS_IMPORT,
    GENERATE_CONTACT_EXPORT,
    GENERATE_COMPANY_EXPORT,
    SEND_EMAIL,
    SEND_WELCOME_EMAIL,
    KICKOFF_WAITLIST_FIRST_EMAIL,
    SEND_WAITLIST_CAMPAIGN_HOURLY,
    CHECK_TRIAL_EXPIRATIONS,
    SYNC_CONTACT,
    SYNC_ALL_CONTACTS,
    RECONCILE_JOBS,
    PROCESS_EMAIL_EVENTS,
)
EXPORT_ROUTES: dict[ExportKind, Route] = {
    "contacts": GENERATE_CONTACT_EXPORT,
    "companies": GENERATE_COMPANY_EXPORT,
}


def routes_of(queue: QueueName) -> tuple[Route, ...]:
    return tuple(route for route in ROUTES if route.queue == queue)


async def enqueue(
    redis: ArqRedis, route: Route, arq_job_id: str | None, **kwargs: Any
) -> Job | None:
    """Enqueue `route`'s job on its queue; None when arq already holds a job of that id.

    With OpenTelemetry, in a PRODUCER span whose context the payload carries (worker/tracing.py).
    """
    with enqueue_span(route.name, route.queue, arq_job_id) as enqueued:
        job = await redis.enqueue_job(
            route.name, _job_id=arq_job_id, _queue_name=route.queue, **kwargs
        )
        enqueued(job)
        return job


def import_job_id(import_id: uuid.UUID | str) -> str:
    return IMPORT_JOB_IDS.build(import_id)


def import_continuation_job_id(import_id: uuid.UUID | str, from_row: int) -> str:
    """The job that carries an import on from its checkpoint after a soft time limit."""
    return f"{import_job_id(import_id)}:from:{from_row}"


def import_continuation_pointer(import_id: uuid.UUID | str) -> str:
    """Redis key holding the id of the import's latest continuation job (for the reconciler)."""
    return f"c360:import-continuation:{import_id}"


def export_job_id(export_id: uuid.UUID | str) -> str:
    return EXPORT_JOB_IDS.build(export_id)


def caller_email_job_id(idempotency_key: str) -> str:
    """A `send_email` under the caller's own key (the outbox row is `caller/<key>`)."""
    return CALLER_EMAIL_JOB_IDS.build(idempotency_key)


def welcome_job_id(user_id: uuid.UUID | str) -> str:
    return WELCOME_JOB_IDS.build(user_id)


def waitlist_kickoff_job_id(entry_id: uuid.UUID | str) -> str:
    return WAITLIST_JOB_IDS.build(entry_id)


_CONTINUATION = re.compile(r"(.+):from:([0-9]+)", re.ASCII)


def row_of_job_id(job_id: str) -> tuple[RowKind, uuid.UUID] | None:
    """The import or export row a job id above names, or None for any other id.

    Only the exact strings the builders above produce count (an id is rebuilt and compared),
    so an owner check on the row cannot be sidestepped by a differently spelt id.
    """
    continued = _CONTINUATION.fullmatch(job_id)
    if continued is not None:
        import_id = IMPORT_JOB_IDS.key_of(continued[1])
        if import_id is None or import_continuation_job_id(import_id, int(continued[2])) != job_id:
            return None
        return "import", uuid.UUID(import_id)
    for ids in (IMPORT_JOB_IDS, EXPORT_JOB_IDS):
        key = ids.key_of(job_id)
        if key is not None and ids.row is not None:
            return ids.row, uuid.UUID(key)
    return None

"""What an operator may change from the console: cancel an import, retry a failed import or
export, resolve an email held for `review`. Each is logged with who asked, and when (the log
line's time).

A retry keeps the row and its deterministic arq id (`import:<id>`, `export:<id>`): the reconciler
and the owner checks know the job by that id. arq refuses to enqueue an id whose result it
still keeps, so the failed try's result is dropped first (its error stays on the row and in
`c360:failures`). An import resumes from its last committed batch: the checkpoint is the row's
`processed_rows`, which a retry leaves alone.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from sqlalchemy import func, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob, EmailMessage, Export
from jobs.email.keys import send_job
from jobs.email.outbox import Draft
from worker.client import ImportStatus, JobsClient
from worker.routes import (
    EXPORT_ROUTES,
    PROCESS_CONTACTS_IMPORT,
    Route,
    enqueue,
    export_job_id,
    import_job_id,
)

log = logging.getLogger(__name__)
Sessions = async_sessionmaker[AsyncSession]


class ActionRefused(Exception):
    """The row is not in a state the action applies to; the message says why (HTTP 409)."""


async def cancel_import(jobs: JobsClient, import_id: uuid.UUID, who: str) -> ImportStatus:
    status = await jobs.cancel_import(import_id)
    log.info("console: %s cancelled import %s (now %s)", who, import_id, status.status)
    return status


async def _enqueue_fresh(redis: ArqRedis, route: Route, arq_job_id: str, **kwargs: Any) -> None:
    """Enqueue `arq_job_id` again once its earlier job has ended, dropping the old result."""
    live = await redis.exists(job_key_prefix + arq_job_id, in_progress_key_prefix + arq_job_id)
    if live:
        raise ActionRefused(f"job {arq_job_id} is still queued or running")
    await redis.delete(result_key_prefix + arq_job_id)
    if await enqueue(redis, route, arq_job_id, **kwargs) is None:
        raise ActionRefused(f"job {arq_job_id} was enqueued by someone else meanwhile")


async def retry_import(sessions: Sessions, redis: ArqRedis, import_id: uuid.UUID, who: str) -> None:
    async with sessions.begin() as session:
        reopened = await session.scalar(
            update(ContactImportJob)
            .where(ContactImportJob.id == import_id, ContactImportJob.status == "failed")
            .values(status="pending", finished_at=None, message=None, cancel_requested=False)
            .returning(ContactImportJob.processed_rows)
        )
    if reopened is None:
        raise ActionRefused(f"import {import_id} is not failed; only a failed import is retried")
    # After the commit: the job must find the row `pending` (as the client enqueues).
    await _enqueue_fresh(
        redis, PROCESS_CONTACTS_IMPORT, import_job_id(import_id), job_id=str(import_id)
    )
    log.info("console: %s retried import %s from row %d", who, import_id, reopened)


async def retry_export(sessions: Sessions, redis: ArqRedis, export_id: uuid.UUID, who: str) -> None:
    async with sessions.begin() as session:
        kind = await session.scalar(
            update(Export)
            .where(Export.id == export_id, Export.status == "failed")
            .values(status="pending", finished_at=None, error=None)
            .returning(Export.kind)
        )
    if kind is None:
        raise ActionRefused(f"export {export_id} is not failed; only a failed export is retried")
    route = EXPORT_ROUTES["contacts" if kind == "contacts" else "companies"]
    await _enqueue_fresh(redis, route, export_job_id(export_id), export_id=str(export_id))
    log.info("console: %s retried export %s", who, export_id)


async def mark_email_sent(sessions: Sessions, message_id: uuid.UUID, who: str) -> None:
    """The operator checked the provider: the email did go out."""
    async with sessions.begin() as session:
        done = await session.scalar(
            update(EmailMessage)
            .where(EmailMessage.id == message_id, EmailMessage.status == "review")
            .values(status="sent", sent_at=func.now())
            .returning(EmailMessage.id)
        )
    if done is None:
        raise ActionRefused(f"email {message_id} is not held for review")
    log.info("console: %s marked email %s as sent", who, message_id)


async def send_email_again(
    sessions: Sessions, redis: ArqRedis, message_id: uuid.UUID, who: str
) -> None:
    """The operator checked the provider: the email did not go out; send it (once) again."""
    async with sessions.begin() as session:
        row = await session.get(EmailMessage, message_id, with_for_update=True)
        if row is None or row.status != "review":
            raise ActionRefused(f"email {message_id} is not held for review")
        job = send_job(
            Draft(row.idempotency_key, row.to_email, row.subject, row.html, row.text_body)
        )
        if job is None:
            # Campaign steps and trial notices: their cron owns the send, not a job of its own.
            raise ActionRefused(
                f"email {message_id} belongs to a scheduled campaign or notice; "
                "mark it as sent, or leave it for the campaign"
            )
        row.status = "pending"
        row.last_error = None
    await _enqueue_fresh(redis, job.route, job.arq_job_id, **job.kwargs)
    log.info("console: %s sent email %s again", who, message_id)

"""What the console's pages show, read from PostgreSQL rows and our Redis keys.

Lists are paged and filtered in SQL (`LIMIT`/`OFFSET` over an ORDER BY), never by scanning
Redis per job, so a page costs the same with 10^6 rows. Nothing here returns an email address,
an email body or a contact's data: ids, counts, statuses and times only; free text that may
hold an address (provider errors, job errors) goes through `redact`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from arq.connections import ArqRedis
from arq.cron import next_cron
from arq.jobs import Job, JobStatus
from arq.utils import to_unix_ms
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import (
    EMAIL_STATUSES,
    EXPORT_STATUSES,
    IMPORT_STATUSES,
    ContactImportError,
    ContactImportJob,
    EmailMessage,
    Export,
)
from worker.client import ImportStatus
from worker.main import queue_jobs
from worker.ratelimit import RateLimiter
from worker.serialization import deserialize
from worker.settings import Settings
from worker.stats import FAILURES_KEY, MAX_FAILURES

PAGE_ROWS = 50
FIRST_ROW_ERRORS = 20
Sessions = async_sessionmaker[AsyncSession]

_EMAIL = re.compile(r"[^\s<>\"'@]+@[^\s<>\"'@]+\.[^\s<>\"'@]+")
# Job arguments shown as they are: ids. Anything else (addresses, subjects, bodies) is hidden.
SHOWN_ARGUMENTS = frozenset({"job_id", "export_id", "user_id", "entry_id"})
_SHOWN_RESULT_TEXT = frozenset({"export_id", "job_id", "kind", "status", "note", "written"})


def redact(text: str | None) -> str | None:
    """`text` with anything shaped like an email address replaced."""
    return None if text is None else _EMAIL.sub("<address hidden>", text)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def page_of(raw: str | None) -> int:
    try:
        return max(1, int(raw or 1))
    except ValueError:
        return 1


def _status_filter(raw: str | None, known: tuple[str, ...]) -> str | None:
    return raw if raw in known else None


# -- imports ---------------------------------------------------------------------------------


def import_view(row: ContactImportJob, now: datetime) -> dict[str, Any]:
    """`ImportStatus`'s fields, plus the owner's id, rows/s and the ETA of a running import."""
    status = ImportStatus.of(row).model_dump(mode="json")
    rate = eta = None
    if row.status == "processing" and row.started_at and row.processed_rows:
        elapsed_s = max((now - row.started_at).total_seconds(), 1e-3)
        rate = round(row.processed_rows / elapsed_s, 1)
        if row.total_rows:
            eta = round(max(row.total_rows - row.processed_rows, 0) / rate, 1)
    return {
        **status,
        "message": redact(row.message),
        "user_id": str(row.user_id),
        "created_at": _iso(row.created_at),
        "rows_per_s": rate,
        "eta_s": eta,
        "cancellable": row.status in ("pending", "processing"),
        "retryable": row.status == "failed",
    }


async def imports_page(sessions: Sessions, status: str | None, page: int) -> dict[str, Any]:
    wanted = _status_filter(status, IMPORT_STATUSES)
    where: list[ColumnElement[bool]] = [] if wanted is None else [ContactImportJob.status == wanted]
    async with sessions() as session:
        rows = await session.scalars(
            select(ContactImportJob)
            .where(*where)
            .order_by(ContactImportJob.created_at.desc(), ContactImportJob.id)
            .limit(PAGE_ROWS + 1)
            .offset((page - 1) * PAGE_ROWS)
        )
        found = list(rows)
        now = await session.scalar(select(func.now()))
    assert now is not None
    return {
        "status": wanted,
        "page": page,
        "has_next": len(found) > PAGE_ROWS,
        "imports": [import_view(row, now) for row in found[:PAGE_ROWS]],
    }


async def import_detail(sessions: Sessions, import_id: uuid.UUID) -> dict[str, Any] | None:
    async with sessions() as session:
        row = await session.get(ContactImportJob, import_id)
        if row is None:
            return None
        errors = await session.execute(
            select(ContactImportError.row_number, ContactImportError.message)
            .where(ContactImportError.job_id == import_id)
            .order_by(ContactImportError.row_number)
            .limit(FIRST_ROW_ERRORS)
        )
        now = await session.scalar(select(func.now()))
    assert now is not None
    # Row errors name the column and the problem; the row's values (contact data) stay out.
    return {
        **import_view(row, now),
        "row_errors": [{"row_number": n, "message": redact(m)} for n, m in errors],
    }


# -- exports ---------------------------------------------------------------------------------


async def exports_page(sessions: Sessions, status: str | None, page: int) -> dict[str, Any]:
    wanted = _status_filter(status, EXPORT_STATUSES)
    where: list[ColumnElement[bool]] = [] if wanted is None else [Export.status == wanted]
    async with sessions() as session:
        rows = list(
            await session.scalars(
                select(Export)
                .where(*where)
                .order_by(Export.created_at.desc(), Export.id)
                .limit(PAGE_ROWS + 1)
                .offset((page - 1) * PAGE_ROWS)
            )
        )
    return {
        "status": wanted,
        "page": page,
        "has_next": len(rows) > PAGE_ROWS,
        "exports": [
            {
                "id": str(row.id),
                "user_id": str(row.user_id),
                "kind": row.kind,
                "status": row.status,
                "row_count": row.row_count,
                "error": redact(row.error),
                "created_at": _iso(row.created_at),
                "finished_at": _iso(row.finished_at),
                "retryable": row.status == "failed",
                "downloadable": row.status == "completed",
            }
            for row in rows[:PAGE_ROWS]
        ],
    }


# -- email -----------------------------------------------------------------------------------


async def email_page(
    sessions: Sessions, redis: ArqRedis, settings: Settings, page: int
) -> dict[str, Any]:
    async with sessions() as session:
        grouped = await session.execute(
            select(EmailMessage.status, func.count()).group_by(EmailMessage.status)
        )
        counts: dict[str, int] = {status: count for status, count in grouped}
        review = list(
            await session.execute(
                select(
                    EmailMessage.id,
                    EmailMessage.provider,
                    EmailMessage.attempts,
                    EmailMessage.last_error,
                    EmailMessage.created_at,
                    EmailMessage.updated_at,
                )
                .where(EmailMessage.status == "review")
                .order_by(EmailMessage.updated_at.desc(), EmailMessage.id)
                .limit(PAGE_ROWS + 1)
                .offset((page - 1) * PAGE_ROWS)
            )
        )
    limiter = RateLimiter(redis, settings.email_rate_per_s)
    return {
        "counts": {status: int(counts.get(status, 0)) for status in EMAIL_STATUSES},
        "page": page,
        "has_next": len(review) > PAGE_ROWS,
        "review": [
            {
                "id": str(row.id),
                "provider": row.provider,
                "attempts": row.attempts,
                "last_error": redact(row.last_error),
                "created_at": _iso(row.created_at),
                "updated_at": _iso(row.updated_at),
            }
            for row in review[:PAGE_ROWS]
        ],
        "rate_limiter": {
            "rate_per_s": settings.email_rate_per_s,
            "paused_for_s": round(await limiter.paused_for_s(), 1),
            "halted": redact(await limiter.halted()),
        },
    }


# -- jobs, failures, crons -------------------------------------------------------------------


def _shown(value: Any, key: str, shown_text: frozenset[str]) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if key in shown_text else "<hidden>"
    if isinstance(value, dict):
        return {str(k): _shown(v, str(k), shown_text) for k, v in value.items()}
    return "<hidden>"


async def recent_failures(redis: ArqRedis) -> list[dict[str, Any]]:
    # redis-py types list commands for sync and async clients at once.
    raw = await cast(Awaitable[list[bytes]], redis.lrange(FAILURES_KEY, 0, MAX_FAILURES - 1))
    failures = []
    for item in raw:
        failure = json.loads(item)
        failure["error"] = redact(str(failure.get("error", "")))
        failures.append(failure)
    return failures


_VARIABLE = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27,}|\b\d+(\.\d+)?\b|'[^']*'|\"[^\"]*\"")


def error_kind(error: str) -> str:
    """A failure's message with ids, numbers and quoted values blanked: failures group on it.

    The job wrapper records `str(exc)`, not the exception's type, so the message's shape is
    what tells two kinds of failure apart.
    """
    first_line = (error.splitlines() or [""])[0]
    return _VARIABLE.sub("…", first_line)[:200] or "(no message)"


def group_failures(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for failure in failures:
        key = (failure.get("job", "-"), error_kind(failure.get("error") or ""))
        group = groups.setdefault(key, {"job": key[0], "kind": key[1], "failures": []})
        group["failures"].append(failure)
    return sorted(groups.values(), key=lambda g: -len(g["failures"]))


async def job_detail(redis: ArqRedis, arq_job_id: str) -> dict[str, Any]:
    """An arq job: function, arguments (ids only), times, result, and its recorded failures."""
    job = Job(arq_job_id, redis, _deserializer=deserialize)
    status = await job.status()
    info = await job.info()
    detail: dict[str, Any] = {"job_id": arq_job_id, "status": status.value}
    if info is not None:
        detail |= {
            "function": info.function,
            "arguments": _shown(info.kwargs, "", SHOWN_ARGUMENTS),
            "positional_arguments": len(info.args),
            "tries": info.job_try,
            "enqueued_at": _iso(info.enqueue_time),
        }
        if status is JobStatus.complete:
            result = await job.result_info()
            if result is not None:
                outcome = result.result
                detail |= {
                    "success": result.success,
                    "started_at": _iso(result.start_time),
                    "finished_at": _iso(result.finish_time),
                    "result": _shown(outcome, "", _SHOWN_RESULT_TEXT)
                    if result.success
                    else redact(str(outcome)),
                }
    detail["failures"] = [f for f in await recent_failures(redis) if f.get("job_id") == arq_job_id]
    return detail


def _previous_fire(schedule: Any, now: datetime) -> datetime | None:
    """The last tick at or before `now`: arq only steps forward, so search a growing window."""
    for window in (timedelta(minutes=2), timedelta(hours=2), timedelta(days=2)):
        tick = next_cron(now - window, hour=schedule.hour, minute=schedule.minute, second=0)
        last = None
        while tick <= now:
            last = tick
            tick = next_cron(tick, hour=schedule.hour, minute=schedule.minute, second=0)
        if last is not None:
            return last
    return None


async def crons(redis: ArqRedis, settings: Settings) -> list[dict[str, Any]]:
    """Each schedule of the default worker: next tick, and the last tick's job and outcome."""
    now = datetime.now(UTC)
    _, schedules = queue_jobs("default")
    shown = []
    for schedule in schedules:
        name = schedule.to_arq(settings).name
        upcoming = next_cron(now, hour=schedule.hour, minute=schedule.minute, second=0)
        previous = _previous_fire(schedule, now)
        last: dict[str, Any] | None = None
        if previous is not None:
            # arq's cron ids are `<name>:<tick in ms>` (arq.worker, unique crons).
            job_id = f"{name}:{to_unix_ms(previous)}"
            result = await Job(job_id, redis, _deserializer=deserialize).result_info()
            last = {
                "job_id": job_id,
                "tick": _iso(previous),
                "outcome": None
                if result is None
                else ("completed" if result.success else "failed"),
            }
        shown.append(
            {
                "name": name,
                "schedule": f"hour={schedule.hour} minute={schedule.minute} (UTC)",
                "next_fire": _iso(upcoming),
                "next_fire_in_s": round((upcoming - now).total_seconds()),
                "last": last,
            }
        )
    return shown

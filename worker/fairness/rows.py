"""What fair sharing reads from PostgreSQL: a job's row, and its user's other open rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, literal, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import OPEN_STATUSES, ContactImportJob, Export
from worker.routes import EXPORT_JOB_IDS, IMPORT_JOB_IDS, JobIdFormat, RowKind

# How many of a user's younger due jobs one park parks along with itself (see `claim`).
PARK_AHEAD_ROWS = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
JOB_IDS: dict[RowKind, JobIdFormat] = {"import": IMPORT_JOB_IDS, "export": EXPORT_JOB_IDS}


def order_us(created_at: datetime) -> int:
    """`created_at` as whole microseconds since 1970: exact in a sorted set's double score."""
    return (created_at - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Row:
    user_id: uuid.UUID
    created_at: datetime
    has_work: bool  # open, and for an import no cancel requested


def _table(kind: RowKind) -> type[ContactImportJob] | type[Export]:
    return ContactImportJob if kind == "import" else Export


def _has_work(kind: RowKind) -> ColumnElement[bool]:
    if kind == "import":
        return ContactImportJob.status.in_(OPEN_STATUSES) & ContactImportJob.cancel_requested.is_(
            False
        )
    return Export.status.in_(OPEN_STATUSES)


async def row_of(
    sessions: async_sessionmaker[AsyncSession], kind: RowKind, row_id: uuid.UUID
) -> Row | None:
    table = _table(kind)
    async with sessions() as session:
        found = (
            await session.execute(
                select(table.user_id, table.created_at, _has_work(kind)).where(table.id == row_id)
            )
        ).one_or_none()
    return None if found is None else Row(found[0], found[1], bool(found[2]))


async def older_open(
    sessions: async_sessionmaker[AsyncSession],
    kind: RowKind,
    row_id: uuid.UUID,
    row: Row,
    limit: int,
) -> list[str]:
    """The arq ids of the user's oldest `limit` rows enqueued before `row` and still open."""
    table = _table(kind)
    async with sessions() as session:
        ids = await session.scalars(
            select(table.id)
            .where(
                table.user_id == row.user_id,
                _has_work(kind),
                # (created_at, id): rows of one instant keep one order, the sets' member order.
                tuple_(table.created_at, table.id)
                < tuple_(literal(row.created_at), literal(row_id)),
            )
            .order_by(table.created_at, table.id)
            .limit(limit)
        )
        return [JOB_IDS[kind].build(i) for i in ids]


async def younger_open(
    sessions: async_sessionmaker[AsyncSession], kind: RowKind, row_id: uuid.UUID, row: Row
) -> list[tuple[str, int]]:
    """(arq id, order) of the user's oldest `PARK_AHEAD_ROWS` open rows enqueued after `row`."""
    table = _table(kind)
    async with sessions() as session:
        found = await session.execute(
            select(table.id, table.created_at)
            .where(
                table.user_id == row.user_id,
                _has_work(kind),
                tuple_(table.created_at, table.id)
                > tuple_(literal(row.created_at), literal(row_id)),
            )
            .order_by(table.created_at, table.id)
            .limit(PARK_AHEAD_ROWS)
        )
        return [(JOB_IDS[kind].build(i), order_us(created_at)) for i, created_at in found]

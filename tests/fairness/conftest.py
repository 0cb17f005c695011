"""Fair-sharing rig: import and export rows of several users, arq's view of a job's pickup,
and where a job stands in its queue."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from arq.constants import in_progress_key_prefix, retry_key_prefix
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.reliability.conftest import Processes
from worker.client import JobsClient
from worker.import_source import user_import_dir
from worker.lease import LEASE_MS
from worker.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


def contacts_csv(rows: int, tag: str) -> str:
    lines = ["email,first_name"] + [f"{tag}-{n}@example.com,N{n}" for n in range(rows)]
    return "\n".join(lines) + "\n"


async def new_import(client: JobsClient, user_id: uuid.UUID, rows: int = 3) -> uuid.UUID:
    """An import of `rows` contacts, created and enqueued by the client as a web app would."""
    home = user_import_dir(client.settings, user_id)
    home.mkdir(exist_ok=True)
    path = home / f"{uuid.uuid4().hex[:8]}.csv"
    path.write_text(contacts_csv(rows, path.stem))
    return (await client.import_contacts(user_id, str(path))).id


async def picked_up(redis: aioredis.Redis, arq_job_id: str) -> None:
    """What arq does when a worker starts a try: the in-progress claim (cut to our lease) and
    the try counter."""
    await redis.psetex(in_progress_key_prefix + arq_job_id, LEASE_MS, b"1")
    await redis.incr(retry_key_prefix + arq_job_id)


async def score_s_from_now(redis: aioredis.Redis, queue: str, arq_job_id: str) -> float | None:
    """Seconds until the job is due in arq's queue (negative: due), None when not queued."""
    score = await redis.zscore(queue, arq_job_id)
    return None if score is None else score / 1000 - time.time()


async def parked(redis: aioredis.Redis, queue: str, arq_job_ids: list[str]) -> bool:
    """True when every job is in its queue and due no sooner than a minute from now."""
    for arq_job_id in arq_job_ids:
        due_in_s = await score_s_from_now(redis, queue, arq_job_id)
        if due_in_s is None or due_in_s < 60:
            return False
    return True


async def import_times(
    sessions: Sessions, ids: list[uuid.UUID]
) -> list[tuple[str, object, object]]:
    """(status, started_at, finished_at) of each import, in the order of `ids`."""
    async with sessions() as session:
        rows = {
            row[0]: (row[1], row[2], row[3])
            for row in await session.execute(
                text(
                    "SELECT id, status, started_at, finished_at FROM contact_import_jobs"
                    " WHERE id = ANY(:ids)"
                ),
                {"ids": ids},
            )
        }
    return [rows[i] for i in ids]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


def settings_with(settings: Settings, **update: object) -> Settings:
    return settings.model_copy(update=update)

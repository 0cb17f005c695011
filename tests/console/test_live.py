"""The console's live parts against real services: the jobs-per-minute series, the workers page
with a real worker process, and one import's server-sent events over real HTTP (uvicorn)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob
from tests.conftest import RunBurst
from tests.console.conftest import log_in
from tests.console.test_auth import _forged
from tests.imports.conftest import start_import
from tests.reliability import conftest as reliability
from tests.reliability.conftest import Processes, wait_for, worker_env
from tests.reliability.test_status import fails, flaky, succeeds
from tests.support.redis_replies import reply
from worker.client import JobsClient
from worker.observe import collect
from worker.routes import QUEUES
from worker.settings import Settings
from worker.stats import CHART_MINUTES, MINUTE_TTL_S, OUTCOMES, minute_key, stats_key, summary
from worker.web.auth import SESSION_COOKIE
from worker.web.console import create_app

Operator = tuple[httpx.AsyncClient, str]
Sessions = async_sessionmaker[AsyncSession]
# The fault tests' rig: real worker processes, killed by process group when the test ends.
processes = reliability.processes
# A guard against a hung stream, not a speed requirement.
EVENT_WAIT_S = 30


async def test_the_per_minute_buckets_equal_the_jobs_run(
    operator: Operator,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    run_burst: RunBurst,
    settings: Settings,
) -> None:
    client, _ = operator
    first_minute = int(time.time() // 60)
    # Out of the window (an hour ago) and at its oldest edge (59 minutes ago).
    await reply(redis_raw.hset(minute_key(first_minute - CHART_MINUTES), "default|completed", "99"))
    await reply(redis_raw.hset(minute_key(first_minute - CHART_MINUTES + 1), "imports|failed", "7"))
    for job in ("succeeds", "succeeds", "succeeds", "fails", "flaky"):
        await arq_redis.enqueue_job(job, _queue_name="default")
    await run_burst("default", jobs=[succeeds, fails, flaky])

    series = (await client.get("/api/overview")).json()["jobs_per_minute"]
    last_minute = int(time.time() // 60)
    assert set(series["queues"]) == set(QUEUES)
    ran = {o: sum(series["queues"]["default"][o]) for o in OUTCOMES}
    assert ran == {"completed": 4, "failed": 1, "retried": 1, "died": 0}
    # Every try the job wrapper counted is in the chart (the stats counters are cumulative).
    assert ran == summary(await reply(redis_raw.hgetall(stats_key("default"))))
    for counts in series["queues"]["default"].values():
        assert len(counts) == CHART_MINUTES
        # Only the minutes the burst ran in hold its tries (normally the last one).
        assert sum(counts[: CHART_MINUTES - 1 - (last_minute - first_minute)]) == 0
    oldest = series["queues"]["imports"]["failed"]
    window_start = series["first_minute_at_s"] // 60
    assert window_start == last_minute - CHART_MINUTES + 1
    assert oldest[0] == (7 if window_start == first_minute - CHART_MINUTES + 1 else 0)
    assert 3600 < await redis_raw.ttl(minute_key(last_minute)) <= MINUTE_TTL_S
    # `status --json` carries the same series.
    status = await collect(settings)
    assert status["jobs_per_minute"]["queues"]["default"] == series["queues"]["default"]
    page = await client.get("/")
    assert 'id="jobs-chart" data-chart="jobs_per_minute"' in page.text


def _shown(worker: dict[str, Any]) -> dict[str, Any]:
    return {k: worker[k] for k in ("worker", "pid", "started_at", "rss_bytes", "jobs_done")}


async def test_the_workers_page_shows_a_real_worker_process(
    operator: Operator,
    settings: Settings,
    arq_redis: ArqRedis,
    processes: Processes,
) -> None:
    client, _ = operator
    env = worker_env(settings, c360_job_modules="tests.metrics.metric_jobs")
    before_s = int(time.time())
    process = processes.start("work", "default", env=env)

    async def listed() -> dict[str, Any] | None:
        workers = (await client.get("/api/workers")).json()["workers"]
        return next((w for w in workers if w["pid"] == process.pid), None)

    worker = await wait_for(listed, 60, f"worker {process.pid} on the workers page")
    assert worker["queue"] == "default"
    assert worker["host"] == socket.gethostname()
    assert worker["worker"] == f"{socket.gethostname()}:{process.pid}"
    assert before_s <= datetime.fromisoformat(worker["started_at"]).timestamp() <= time.time()
    assert worker["rss_bytes"] > 0 and worker["rss_mb"] > 0
    assert worker["jobs_done"] == 0 and worker["running"] == []

    await arq_redis.enqueue_job("nap", 3.0, _queue_name="default", _job_id="nap-1")

    async def running() -> bool:
        found = await listed()
        return found is not None and found["running"] == ["nap-1"]

    await wait_for(running, 30, "the worker to show the job it runs")

    async def done() -> bool:
        found = await listed()
        return found is not None and found["jobs_done"] == 1 and found["running"] == []

    # arq writes its counters with each heartbeat (every 10 s).
    await wait_for(done, 40, "the worker's jobs done to reach 1")

    async def same_as_status() -> bool:
        # RSS is refreshed every few seconds: the two reads agree once neither straddles one.
        cli = next(
            w
            for w in (await collect(settings))["queues"]["default"]["workers"]
            if w["pid"] == process.pid
        )
        found = await listed()
        return found is not None and _shown(found) == _shown(cli)

    await wait_for(same_as_status, 30, "the page and status --json to agree")
    page = await client.get("/workers")
    assert f"{socket.gethostname()}:{process.pid}" in page.text
    assert worker["started_at"] in page.text


# -- server-sent events ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def served(console_settings: Settings) -> AsyncIterator[str]:
    """The console served by uvicorn on a loopback port (streams need a real server)."""
    port = _free_port()
    config = uvicorn.Config(
        create_app(console_settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return server.started

    await wait_for(started, 20, "the console to listen")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def _read_events(response: httpx.Response, into: asyncio.Queue[tuple[str, Any]]) -> None:
    """Parse the stream into (event name, JSON data); ("closed", None) when it ends."""
    name, data = "message", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                await into.put((name, json.loads("\n".join(data))))
            name, data = "message", list[str]()
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())
    await into.put(("closed", None))


async def _next(events: asyncio.Queue[tuple[str, Any]]) -> tuple[str, Any]:
    async with asyncio.timeout(EVENT_WAIT_S):
        return await events.get()


async def _processing_import(
    sessions: Sessions, user_id: uuid.UUID, total_rows: int | None = None
) -> uuid.UUID:
    """A running import's row, with no job behind it: the test moves it on by hand."""
    row = ContactImportJob(
        id=uuid.uuid4(),
        user_id=user_id,
        file_path="x.csv",
        status="processing",
        total_rows=total_rows,
        processed_rows=0,
        started_at=datetime.now(UTC),
    )
    async with sessions.begin() as session:
        session.add(row)
    return row.id


async def _set(sessions: Sessions, import_id: uuid.UUID, **values: Any) -> None:
    assignments = ", ".join(f"{name} = :{name}" for name in values)
    async with sessions.begin() as session:
        await session.execute(
            text(f"UPDATE contact_import_jobs SET {assignments} WHERE id = :id"),
            {"id": import_id, **values},
        )


async def test_import_events_follow_the_row_and_end_with_the_import(
    served: str, sessions: Sessions, user_id: uuid.UUID
) -> None:
    import_id = await _processing_import(sessions, user_id, total_rows=300)
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    async with httpx.AsyncClient(base_url=served) as client:
        await log_in(client)
        async with client.stream("GET", f"/api/imports/{import_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            reader = asyncio.create_task(_read_events(response, events))
            name, first = await _next(events)
            assert (name, first["status"], first["processed_rows"]) == ("message", "processing", 0)

            await _set(sessions, import_id, processed_rows=100)  # a batch committed
            name, moved = await _next(events)
            assert (name, moved["processed_rows"], moved["percent"]) == ("message", 100, 33.3)

            await _set(sessions, import_id, processed_rows=300, status="completed")
            name, last = await _next(events)
            assert (name, last["status"], last["processed_rows"]) == ("message", "completed", 300)
            assert (await _next(events))[0] == "end"
            assert await _next(events) == ("closed", None)  # the server ended the stream
            await reader


async def test_import_events_carry_a_real_import_to_its_end(
    served: str, jobs_client: JobsClient, run_burst: RunBurst, user_id: uuid.UUID
) -> None:
    import_id = await start_import(jobs_client, user_id, "email\na@x.io\nb@x.io\nc@x.io\n")
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    async with httpx.AsyncClient(base_url=served) as client:
        await log_in(client)
        async with client.stream("GET", f"/api/imports/{import_id}/events") as response:
            reader = asyncio.create_task(_read_events(response, events))
            name, first = await _next(events)
            assert (name, first["status"]) == ("message", "pending")
            await run_burst("imports")
            seen = [first]
            while (event := await _next(events))[0] == "message":
                seen.append(event[1])
            assert event[0] == "end"
            assert (seen[-1]["status"], seen[-1]["processed_rows"]) == ("completed", 3)
            assert await _next(events) == ("closed", None)
            await reader


async def test_import_events_need_a_session(
    anonymous: httpx.AsyncClient, sessions: Sessions, user_id: uuid.UUID
) -> None:
    import_id = await _processing_import(sessions, user_id)
    url = f"/api/imports/{import_id}/events"
    assert (await anonymous.get(url)).status_code == 401
    anonymous.cookies.set(SESSION_COOKIE, _forged("a-guessed-key"))
    assert (await anonymous.get(url)).status_code == 401
    anonymous.cookies.clear()
    await log_in(anonymous)
    assert (await anonymous.get(f"/api/imports/{uuid.uuid4()}/events")).status_code == 404
    page = await anonymous.get(f"/imports/{import_id}")
    assert f'data-events="{url}"' in page.text

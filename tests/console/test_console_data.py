"""What the console shows and does, against real Redis, PostgreSQL and burst workers."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.support.heartbeats import fake_heartbeat
from tests.support.redis_replies import reply
from worker.client import JobsClient
from worker.lease import running_key
from worker.observe import collect
from worker.settings import Settings
from worker.stats import stats_key

Operator = tuple[httpx.AsyncClient, str]
XSS = "<img src=x onerror=alert(1)>"


async def test_overview_equals_what_redis_holds_and_what_status_shows(
    operator: Operator, arq_redis: ArqRedis, redis_raw: aioredis.Redis, settings: Settings
) -> None:
    client, _ = operator
    for n in range(3):
        await arq_redis.enqueue_job("send_email", _queue_name="default", _job_id=f"e{n}")
    await arq_redis.enqueue_job("process_contacts_import", _queue_name="imports", _defer_by=600)
    now_ms = int(time.time() * 1000)
    await reply(
        redis_raw.hset(
            running_key("exports"),
            "export:x",
            json.dumps({"worker": "h:1", "started_ms": now_ms, "lease_until_ms": now_ms + 9000}),
        )
    )
    await reply(
        redis_raw.hset(stats_key("default"), mapping={"completed": 5, "failed": 2, "died": 1})
    )
    await fake_heartbeat(redis_raw, "default:health-check:h:9", "Dec-01 j_complete=5", ttl_ms=8000)

    overview = (await client.get("/api/overview")).json()

    # CONTRACT §12's `queues`, and the chart's series next to it.
    assert set(overview) == {"queues", "jobs_per_minute"} and set(overview["queues"]) == {
        "imports",
        "exports",
        "default",
    }
    default = overview["queues"]["default"]
    assert {k: v for k, v in default.items() if k != "oldest_queued_age_s"} == {
        "queued": 3,
        "deferred": 0,
        "running": 0,
        "workers": 1,
        "completed": 5,
        "failed": 2,
        "retried": 0,
        "died": 1,
    }
    assert default["oldest_queued_age_s"] >= 0
    assert overview["queues"]["imports"]["deferred"] == 1
    assert overview["queues"]["imports"]["oldest_queued_age_s"] is None
    assert overview["queues"]["exports"]["running"] == 1
    # One source of truth: `status --json` shows the same numbers.
    status = await collect(settings)
    for name, queue in overview["queues"].items():
        cli = status["queues"][name]
        assert (queue["queued"], queue["deferred"], queue["running"]) == (
            cli["queued"],
            cli["deferred"],
            cli["running"],
        )
        assert queue["workers"] == len(cli["workers"])
        assert {k: queue[k] for k in cli["counts"]} == cli["counts"]


async def _import(jobs_client: JobsClient, settings: Settings, user_id: uuid.UUID) -> uuid.UUID:
    folder = settings.import_dir / str(user_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.csv").write_text("email\nann@example.com\n")
    return (await jobs_client.import_contacts(user_id, "a.csv")).id


async def test_cancel_needs_csrf_and_then_cancels(
    operator: Operator, jobs_client: JobsClient, settings: Settings, user_id: uuid.UUID
) -> None:
    client, token = operator
    import_id = await _import(jobs_client, settings, user_id)
    refused = await client.post(f"/api/imports/{import_id}/cancel")
    assert refused.status_code == 403
    assert (await jobs_client.import_status(import_id)).status == "pending"

    answer = await client.post(f"/api/imports/{import_id}/cancel", headers={"x-csrf-token": token})
    assert answer.status_code == 200, answer.text
    assert (await jobs_client.import_status(import_id)).status == "cancelled"
    shown = (await client.get(f"/api/imports/{import_id}")).json()
    expected = (await jobs_client.import_status(import_id)).model_dump(mode="json")
    assert {k: shown[k] for k in expected} == expected


async def test_a_failed_export_retried_completes_through_a_worker(
    operator: Operator,
    jobs_client: JobsClient,
    run_burst: RunBurst,
    user_id: uuid.UUID,
    sessions: async_sessionmaker[AsyncSession],
    redis_raw: aioredis.Redis,
) -> None:
    client, token = operator
    async with sessions.begin() as session:
        await session.execute(
            text("INSERT INTO contacts (user_id, email) VALUES (:u, 'a@example.com')"),
            {"u": user_id},
        )
    export = await jobs_client.export_contacts(user_id)
    await run_burst("exports")
    # Fail it the way the job's on_failure does; arq keeps the finished job's result.
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE exports SET status = 'failed', error = 'disk full' WHERE id = :id"),
            {"id": export.id},
        )
    assert await redis_raw.exists(f"arq:result:export:{export.id}")
    listed = (await client.get("/api/exports?status=failed")).json()["exports"]
    assert [row["id"] for row in listed] == [str(export.id)]

    answer = await client.post(
        f"/api/exports/{export.id}/retry", data={"csrf_token": token, "next": "/exports"}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/exports"
    await run_burst("exports")

    done = await jobs_client.export_status(export.id)
    assert (done.status, done.row_count, done.error) == ("completed", 1, None)
    again = await client.post(f"/api/exports/{export.id}/retry", headers={"x-csrf-token": token})
    assert again.status_code == 409  # only a failed export is retried


async def test_an_import_message_with_markup_shows_as_text(
    operator: Operator, sessions: async_sessionmaker[AsyncSession], user_id: uuid.UUID
) -> None:
    client, _ = operator
    import_id = uuid.uuid4()
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO contact_import_jobs (id, user_id, file_path, status, message) "
                "VALUES (:id, :u, 'x.csv', 'failed', :m)"
            ),
            {"id": import_id, "u": user_id, "m": f"unknown columns ignored: {XSS}"},
        )
    for path in ("/imports", f"/imports/{import_id}"):
        page = await client.get(path)
        assert page.status_code == 200
        assert XSS not in page.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    shown = (await client.get(f"/api/imports/{import_id}")).json()
    assert XSS in shown["message"]  # JSON carries it; console.js writes it as textContent

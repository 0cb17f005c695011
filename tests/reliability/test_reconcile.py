"""The reconciler re-enqueues what PostgreSQL expects and Redis forgot, exactly once."""

from __future__ import annotations

import json
import time
import uuid

import redis.asyncio as aioredis
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import REDIS_OWNER_KEY, RunBurst
from tests.support.redis_replies import reply
from worker import reconcile
from worker.lease import running_key
from worker.main import QUEUE_CONFIGS
from worker.reconcile import reconcile_jobs
from worker.routes import import_continuation_job_id, import_continuation_pointer
from worker.serialization import deserialize


async def _insert(
    sessions: async_sessionmaker[AsyncSession], table: str, user_id: uuid.UUID, **row: object
) -> uuid.UUID:
    new_id = uuid.uuid4()
    columns = {"id": new_id, "user_id": user_id, **row}
    age_s = columns.pop("age_s", 120)
    names = ", ".join(columns)
    values = ", ".join(f":{name}" for name in columns)
    async with sessions.begin() as session:
        await session.execute(
            text(
                f"INSERT INTO {table} ({names}, created_at) "
                f"VALUES ({values}, now() - make_interval(secs => :age_s))"
            ),
            {**columns, "age_s": age_s},
        )
    return new_id


async def _queued(redis_raw: aioredis.Redis, queue: str) -> list[tuple[str, str, dict[str, str]]]:
    found = []
    for job_id in await redis_raw.zrange(queue, 0, -1):
        payload = deserialize(await redis_raw.get(b"arq:job:" + job_id))
        found.append((job_id.decode(), payload["f"], payload["k"]))
    return sorted(found)


async def test_open_rows_that_redis_forgot_are_enqueued_once_under_their_ids(
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    run_burst: RunBurst,
) -> None:
    pending = await _insert(sessions, "contact_import_jobs", user_id, file_path="a.csv")
    processing = await _insert(
        sessions, "contact_import_jobs", user_id, file_path="b.csv", status="processing"
    )
    known = await _insert(sessions, "contact_import_jobs", user_id, file_path="c.csv")
    await _insert(sessions, "contact_import_jobs", user_id, file_path="d.csv", age_s=5)
    await _insert(sessions, "contact_import_jobs", user_id, file_path="e.csv", status="completed")
    contacts = await _insert(sessions, "exports", user_id, kind="contacts")
    companies = await _insert(sessions, "exports", user_id, kind="companies", status="processing")
    await _insert(sessions, "exports", user_id, kind="contacts", status="failed")

    # Redis lost everything, except one import a worker is running right now.
    await redis_raw.flushdb()
    await redis_raw.set(REDIS_OWNER_KEY, "1")
    await redis_raw.set(f"arq:in-progress:import:{known}", b"1", px=15_000)

    for _ in range(2):  # the second run finds everything in place and enqueues nothing
        await arq_redis.enqueue_job("reconcile_jobs", _queue_name="default")
        await run_burst("default", jobs=[reconcile_jobs])

    assert await _queued(redis_raw, "imports") == sorted(
        [
            (f"import:{pending}", "process_contacts_import", {"job_id": str(pending)}),
            (f"import:{processing}", "process_contacts_import", {"job_id": str(processing)}),
        ]
    )
    assert await _queued(redis_raw, "exports") == sorted(
        [
            (f"export:{contacts}", "generate_contact_export", {"export_id": str(contacts)}),
            (f"export:{companies}", "generate_company_export", {"export_id": str(companies)}),
        ]
    )
    results = [
        deserialize(await redis_raw.get(key))["r"]
        async for key in redis_raw.scan_iter(match="arq:result:*")
    ]
    assert sorted(r["enqueued"] for r in results) == [0, 4]


async def test_an_import_carried_on_by_a_continuation_is_not_enqueued_again(
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
) -> None:
    """Past the soft limit an import runs as `import:<id>:from:<n>`; that counts as known."""
    continued = await _insert(
        sessions, "contact_import_jobs", user_id, file_path="a.csv", status="processing"
    )
    stale_pointer = await _insert(
        sessions, "contact_import_jobs", user_id, file_path="b.csv", status="processing"
    )
    for import_id in (continued, stale_pointer):
        await redis_raw.set(
            import_continuation_pointer(import_id),
            import_continuation_job_id(import_id, 5000),
        )
    # Only the first one's continuation is still queued; the second's was lost with Redis data.
    await arq_redis.enqueue_job(
        "process_contacts_import",
        job_id=str(continued),
        _job_id=import_continuation_job_id(continued, 5000),
        _queue_name="imports",
    )

    expected = await reconcile.expected_jobs(sessions)
    lost = await reconcile.forgotten(arq_redis, expected)

    assert [item.arq_id for item in lost] == [f"import:{stale_pointer}"]


async def test_dead_workers_lease_entries_are_pruned(
    arq_redis: ArqRedis, redis_raw: aioredis.Redis
) -> None:
    now_ms = int(time.time() * 1000)
    await reply(
        redis_raw.hset(
            running_key("imports"),
            mapping={
                "alive": json.dumps({"lease_until_ms": now_ms + 10_000}),
                "dead": json.dumps({"lease_until_ms": now_ms - 1}),
            },
        )
    )
    assert await reconcile.prune_dead_leases(arq_redis) == 1
    assert await reply(redis_raw.hkeys(running_key("imports"))) == [b"alive"]


def test_the_reconciler_is_a_minutely_cron_of_the_default_queue() -> None:
    assert "worker.reconcile" in QUEUE_CONFIGS["default"].job_modules
    (schedule,) = reconcile.CRON_JOBS
    assert (schedule.job.name, schedule.hour, schedule.minute) == ("reconcile_jobs", None, None)
    assert [reconcile_jobs] == reconcile.JOBS


async def test_only_open_one_off_emails_are_expected_and_cron_emails_are_left_to_their_crons(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    """Campaign steps and trial notices stay due for their crons; settled rows are done."""
    rows = {
        "caller/open": ("pending", 120),
        "caller/mid-send": ("sending", 120),
        "welcome/5b0c2b64-6a0b-4cb8-9f57-2a3f1f6a3c01": ("pending", 120),
        "job/0123abcd": ("pending", 120),
        "caller/just-written": ("pending", 5),  # the client enqueues right after its commit
        "caller/sent": ("sent", 120),
        "caller/failed": ("failed", 120),
        "waitlist/5b0c2b64-6a0b-4cb8-9f57-2a3f1f6a3c01/1": ("pending", 120),
        "trial-expired/5b0c2b64-6a0b-4cb8-9f57-2a3f1f6a3c01": ("pending", 120),
    }
    async with sessions.begin() as session:
        for key, (status, age_s) in rows.items():
            await session.execute(
                text(
                    "INSERT INTO email_messages (idempotency_key, to_email, subject, html, status,"
                    " created_at) VALUES (:key, 'a@b.co', 's', 'h', :status,"
                    " now() - make_interval(secs => :age_s))"
                ),
                {"key": key, "status": status, "age_s": age_s},
            )

    expected = await reconcile.expected_jobs(sessions)

    assert sorted((e.arq_id, e.route.name, e.route.queue) for e in expected) == [
        ("0123abcd", "send_email", "default"),
        ("email:mid-send", "send_email", "default"),
        ("email:open", "send_email", "default"),
        ("welcome:5b0c2b64-6a0b-4cb8-9f57-2a3f1f6a3c01", "send_welcome_email", "default"),
    ]
    reopened = await reconcile.still_open(sessions, expected)
    kwargs = {e.arq_id: e.kwargs for e in reopened}
    assert kwargs["email:open"] == {
        "to": "a@b.co",
        "subject": "s",
        "html": "h",
        "text": None,
        "idempotency_key": "open",
    }
    assert kwargs["0123abcd"]["idempotency_key"] is None  # keyless: keyed by its job id
    assert kwargs["welcome:5b0c2b64-6a0b-4cb8-9f57-2a3f1f6a3c01"] == {
        "user_id": "5b0c2b64-6a0b-4cb8-9f57-2a3f1f6a3c01"
    }

"""`/metrics`' exposition after known workloads: every value equals the rows and counters behind it.

Jobs run through real burst workers (in this process, and in worker processes of their own), and
the exposition is read back with prometheus-client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.marketing.sync import RATE_LIMIT_KEY_PREFIX as MARKETING_PREFIX
from tests.conftest import RunBurst
from tests.imports.conftest import start_import
from tests.reliability.conftest import Processes, worker_env
from tests.reliability.test_status import fails, flaky, succeeds
from tests.support.heartbeats import fake_heartbeat
from tests.support.redis_replies import reply
from worker.client import JobsClient
from worker.metrics import render_metrics
from worker.observe import redis_status
from worker.ratelimit import RateLimiter
from worker.routes import PROCESS_CONTACTS_IMPORT, QUEUES, SEND_EMAIL
from worker.settings import Settings
from worker.stats import (
    BUCKET_BOUNDS_S,
    UNFINISHED_KEY_PREFIX,
    metrics_key,
    stats_key,
    summary,
)

Sessions = async_sessionmaker[AsyncSession]
ALERTS = Path(__file__).resolve().parents[2] / "docs" / "prometheus-alerts.yml"
HISTOGRAMS = ("c360_job_duration_seconds", "c360_job_queue_wait_seconds")
# A heartbeat for a queue no test worker serves, so its worker count is exactly one.
HEARTBEAT = ("exports:health-check:hostx:4242", b"Dec-02 j_complete=0 queued=0")


def samples(body: bytes) -> list[Sample]:
    return [s for family in text_string_to_metric_families(body.decode()) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float:
    """The one sample named `name` whose labels are exactly `labels`."""
    (match,) = [s.value for s in found if s.name == name and s.labels == labels]
    return match


def histogram(found: list[Sample], name: str, queue: str, function: str) -> dict[str, float]:
    """le -> cumulative count, in exposition order, plus `_count` and `_sum`."""
    labels = {"queue": queue, "function": function}
    buckets = {
        s.labels["le"]: s.value
        for s in found
        if s.name == f"{name}_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels
    }
    return {
        **buckets,
        "_count": value(found, f"{name}_count", **labels),
        "_sum": value(found, f"{name}_sum", **labels),
    }


def assert_cumulative(buckets: dict[str, float]) -> None:
    les = [le for le in buckets if not le.startswith("_")]
    assert les == [repr(bound) for bound in BUCKET_BOUNDS_S] + ["+Inf"]
    counts = [buckets[le] for le in les]
    assert counts == sorted(counts), counts
    assert buckets["+Inf"] == buckets["_count"]


async def scalar(sessions: Sessions, sql: str) -> Any:
    async with sessions() as session:
        return await session.scalar(text(sql))


async def _import_workload(jobs_client: JobsClient, run_burst: RunBurst, user: uuid.UUID) -> None:
    # 2 created + 1 error, then 1 updated (a@) + 1 created + 2 errors; one burst each, so the
    # second import sees the first's contacts.
    for data in (
        "email,first_name\na@x.io,A\nb@x.io,B\nnot-an-email,C\n",
        "email,first_name\nA@x.io,Ada\nc@x.io,C\nbad,\nworse,\n",
    ):
        await start_import(jobs_client, user, data)
        await run_burst("imports")


async def test_exposition_equals_the_rows_and_counters_after_a_known_workload(
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    run_burst: RunBurst,
    user_id: uuid.UUID,
) -> None:
    await _import_workload(jobs_client, run_burst, user_id)
    for n in range(3):
        await jobs_client.send_email(f"person{n}@example.com", "Hello", "<p>Hi</p>")
    await run_burst("default")
    now_ms = int(time.time() * 1000)
    await arq_redis.enqueue_job("succeeds", _queue_name="default")
    # Due two minutes before it was enqueued: its wait counts from the due time (arq's score).
    due = datetime.fromtimestamp(now_ms / 1000 - 120, UTC)
    await arq_redis.enqueue_job("succeeds", _queue_name="default", _defer_until=due)
    for name in ("fails", "flaky"):
        await arq_redis.enqueue_job(name, _queue_name="default")
    # What a worker killed mid-try leaves: a try counted as started that never ended.
    await reply(redis_raw.hset(f"{UNFINISHED_KEY_PREFIX}survivor", "unfinished", "1"))
    await arq_redis.enqueue_job("succeeds", _queue_name="default", _job_id="survivor")
    await run_burst("default", jobs=[succeeds, fails, flaky])
    # Left in the queues: two due jobs and one deferred, never run.
    await arq_redis.enqueue_job("succeeds", _queue_name="default")
    await arq_redis.enqueue_job("succeeds", _queue_name="default")
    await arq_redis.enqueue_job("succeeds", _queue_name="default", _defer_by=3600)
    await fake_heartbeat(redis_raw, *HEARTBEAT, ttl_ms=60_000)
    await RateLimiter(redis_raw, 1.0).pause_for(600)
    await RateLimiter(redis_raw, 1.0, key_prefix=MARKETING_PREFIX).halt(600, "key re_Secret")

    # An email a person must resolve: in the outbox gauge, not in the counter it may still leave.
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO email_messages (idempotency_key, to_email, subject, html, status) "
                "VALUES ('caller/in-review', 'r@example.com', 'Hi', '<p>Hi</p>', 'review')"
            )
        )

    body = await render_metrics(redis_raw, sessions)
    status = await redis_status(redis_raw, int(time.time() * 1000))
    found = samples(body)

    # Import rows: sums over the import rows, equal to what the tables hold.
    contacts = await scalar(sessions, "SELECT count(*) FROM contacts")
    errors = await scalar(sessions, "SELECT count(*) FROM contact_import_errors")
    assert (contacts, errors) == (3, 3)
    assert value(found, "c360_import_rows_total", outcome="created") == contacts
    assert value(found, "c360_import_rows_total", outcome="updated") == 1
    assert value(found, "c360_import_rows_total", outcome="error") == errors
    assert value(found, "c360_import_jobs", status="completed") == 2
    # The outbox, by provider and status.
    sent = await scalar(sessions, "SELECT count(*) FROM email_messages WHERE status = 'sent'")
    assert sent == 3
    assert value(found, "c360_emails_total", provider="console", status="sent") == sent
    assert value(found, "c360_email_outbox", provider="console", status="sent") == sent
    # The counter holds final statuses only (a counter must never go down); the gauge, all.
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["c360_emails"].type == "counter"
    assert {s.labels["status"] for s in families["c360_emails"].samples} <= {
        "sent", "failed", "suppressed"
    }  # fmt: skip
    assert families["c360_email_outbox"].type == "gauge"
    assert value(found, "c360_email_outbox", provider="none", status="review") == 1

    # Outcomes per function; the histograms count every try that ended (not only successes).
    expected = {
        ("imports", PROCESS_CONTACTS_IMPORT.name): {"completed": 2},
        ("default", SEND_EMAIL.name): {"completed": 3},
        ("default", "succeeds"): {"completed": 3, "died": 1},
        ("default", "fails"): {"failed": 1},
        ("default", "flaky"): {"retried": 1, "completed": 1},
    }
    for (queue, function), outcomes in expected.items():
        for outcome in ("completed", "failed", "retried", "died"):
            got = value(found, "c360_jobs_total", queue=queue, function=function, outcome=outcome)
            assert got == outcomes.get(outcome, 0), (queue, function, outcome)
        for name in HISTOGRAMS:
            buckets = histogram(found, name, queue, function)
            assert_cumulative(buckets)
            ended = sum(n for outcome, n in outcomes.items() if outcome != "died")
            assert buckets["_count"] == ended, (name, queue, function)
    # The job due two minutes ago waited longer than 120 s; the other one is in a lower bucket.
    wait = histogram(found, "c360_job_queue_wait_seconds", "default", "succeeds")
    assert wait["120.0"] <= 2 and wait["_sum"] >= 120
    # The per-function counters add up to the per-queue ones `status` shows: one source.
    for queue in QUEUES:
        per_function = {
            outcome: sum(
                s.value
                for s in found
                if s.name == "c360_jobs_total"
                and s.labels["queue"] == queue
                and s.labels["outcome"] == outcome
            )
            for outcome in ("completed", "failed", "retried", "died")
        }
        assert per_function == status["queues"][queue]["counts"]
        assert per_function == summary(await reply(redis_raw.hgetall(stats_key(queue))))

    # Queues and workers: `status`'s own figures.
    assert value(found, "c360_queue_jobs", queue="default", state="queued") == 2
    assert value(found, "c360_queue_jobs", queue="default", state="deferred") == 1
    assert value(found, "c360_workers", queue="exports") == 1
    for queue in QUEUES:
        for state in ("queued", "deferred", "running"):
            assert (
                value(found, "c360_queue_jobs", queue=queue, state=state)
                == (status["queues"][queue][state])
            )
        assert value(found, "c360_workers", queue=queue) == len(status["queues"][queue]["workers"])
    # Rate limiters: a 429 pause on email, a halt on marketing.
    assert value(found, "c360_rate_limit_paused_seconds", limiter="email") > 500
    assert value(found, "c360_rate_limit_halted", limiter="email") == 0
    assert value(found, "c360_rate_limit_halted", limiter="marketing") == 1
    # Ids and counts only: no address, error text or halt reason.
    for secret in (b"@", b"the input is wrong", b"re_Secret", b"Hello"):
        assert secret not in body


async def test_two_worker_processes_add_into_one_histogram(
    settings: Settings,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    processes: Processes,
) -> None:
    env = worker_env(settings, c360_job_modules="tests.metrics.metric_jobs")
    pids = []
    for runs in (2, 3):
        for _ in range(runs):
            await arq_redis.enqueue_job("nap", 0.3, _queue_name="default")
        worker = processes.start("work", "default", "--burst", env=env)
        assert await processes.wait_exit(worker, 60) == 0, processes.log(worker)
        pids.append(worker.pid)
    assert len(set(pids)) == 2
    # This process ran no job: whatever it shows came through Redis.
    found = samples(await render_metrics(redis_raw, sessions))
    duration = histogram(found, "c360_job_duration_seconds", "default", "nap")
    assert_cumulative(duration)
    assert duration["_count"] == 5
    assert duration["0.25"] == 0  # each try slept 0.3 s
    assert duration["_sum"] >= 1.5
    assert histogram(found, "c360_job_queue_wait_seconds", "default", "nap")["_count"] == 5
    labels = {"queue": "default", "function": "nap"}
    assert value(found, "c360_jobs_total", **labels, outcome="completed") == 5


async def test_buckets_stored_under_other_bounds_fold_into_the_current_ones(
    redis_raw: aioredis.Redis, sessions: Sessions
) -> None:
    # As an older release would have left them: 0.3 s and 7 s are not bounds any more.
    await reply(
        redis_raw.hset(
            metrics_key("default"),
            mapping={
                "old|duration|0.3": 2,
                "old|duration|7.0": 1,
                "old|duration|+Inf": 1,
                "old|duration_sum": 9000.9,
                "old|completed": 4,
            },
        )
    )
    found = samples(await render_metrics(redis_raw, sessions))
    duration = histogram(found, "c360_job_duration_seconds", "default", "old")
    assert_cumulative(duration)
    assert (duration["0.25"], duration["0.5"], duration["5.0"], duration["10.0"]) == (0, 2, 2, 3)
    assert (duration["_count"], duration["_sum"]) == (4, 9000.9)


async def test_alert_rules_parse_and_use_only_exposed_metrics(
    arq_redis: ArqRedis, redis_raw: aioredis.Redis, sessions: Sessions, run_burst: RunBurst
) -> None:
    await arq_redis.enqueue_job("succeeds", _queue_name="default")
    await run_burst("default", jobs=[succeeds])
    body = await render_metrics(redis_raw, sessions)
    families = list(text_string_to_metric_families(body.decode()))
    # Sample names, and family names for the families with no sample yet (no email rows).
    exposed = {s.name for f in families for s in f.samples} | {f.name for f in families}
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {
        "C360JobFailureRateHigh",
        "C360NoLiveWorker",
        "C360QueueWaitHigh",
        "C360EmailProviderPaused",
    }
    for rule in rules:
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        names = set(re.findall(r"\bc360_[a-z_]+", rule["expr"]))
        assert names, rule["alert"]
        assert names <= exposed, (rule["alert"], names - exposed)

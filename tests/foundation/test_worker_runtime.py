"""Worker classes for arq's CLI, the lifecycle of ctx resources, and job-tagged logs."""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from arq.connections import ArqRedis

from tests.conftest import RunBurst
from worker import main
from worker.context import Ctx
from worker.job import job
from worker.lifecycle import shutdown, startup
from worker.logs import JsonFormatter, _JobFieldsFilter
from worker.serialization import deserialize, serialize
from worker.settings import Settings


@pytest.mark.parametrize(
    ("class_name", "queue", "max_jobs"),
    [
        ("ImportsWorker", "imports", 2),
        ("ExportsWorker", "exports", 4),
        ("DefaultWorker", "default", 200),
    ],
)
def test_worker_classes_for_arqs_cli(
    monkeypatch: pytest.MonkeyPatch, class_name: str, queue: str, max_jobs: int
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/9")
    monkeypatch.setenv("KEEP_RESULT_S", "120")
    monkeypatch.setenv("EMAIL_PROVIDER", "console")
    monkeypatch.setattr(main, "queue_jobs", lambda q: ([], []))  # only the shape matters here
    cls = getattr(main, class_name)
    assert cls.queue_name == queue
    assert cls.max_jobs == max_jobs
    assert cls.keep_result == 120
    assert cls.redis_settings.database == 9
    assert (cls.job_serializer, cls.job_deserializer) == (serialize, deserialize)
    assert cls.timezone == ZoneInfo("UTC")
    assert cls.health_check_key.endswith(f":{os.getpid()}")
    assert cls.health_check_key.startswith(f"{queue}:health-check:")


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchWorker"):
        main.NoSuchWorker  # noqa: B018


async def test_startup_opens_and_shutdown_closes_resources(
    settings: Settings, arq_redis: ArqRedis
) -> None:
    ctx: dict[str, Any] = {"settings": settings, "queue_name": "default", "redis": arq_redis}
    await startup(ctx)
    async with ctx["sessions"]() as session:
        assert (
            await session.execute(__import__("sqlalchemy").text("SELECT 41 + 1"))
        ).scalar() == 42
    http = ctx["http"]
    assert not http.is_closed
    assert ctx["email_provider"].name == "console"
    assert ctx["email_rate_limiter"].rate_per_s == settings.email_rate_per_s
    await shutdown(ctx)
    assert http.is_closed
    assert ctx["engine"].pool.checkedout() == 0


captured = io.StringIO()


@job()
async def chatty(ctx: Ctx) -> None:
    logging.getLogger("jobs.chatty").info("working on it")


async def test_job_logs_carry_job_id_name_and_try(arq_redis: ArqRedis, run_burst: RunBurst) -> None:
    handler = logging.StreamHandler(captured)
    handler.addFilter(_JobFieldsFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("jobs.chatty")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        await arq_redis.enqueue_job("chatty", _job_id="chatty-1", _queue_name="default")
        await run_burst("default", jobs=[chatty])
    finally:
        logger.removeHandler(handler)
    line = json.loads(captured.getvalue().strip().splitlines()[-1])
    assert line["msg"] == "working on it"
    assert (line["job_id"], line["job"], line["job_try"]) == ("chatty-1", "chatty", 1)


def test_queues_register_the_contract_job_names() -> None:
    """CONTRACT §5: the names arq knows, per queue, and the default queue's UTC crons."""
    registered = {queue: main.queue_jobs(queue) for queue in main.QUEUE_CONFIGS}
    names = {queue: {d.name for d in jobs} for queue, (jobs, _) in registered.items()}
    assert names["imports"] == {"process_contacts_import"}
    assert names["exports"] == {"generate_contact_export", "generate_company_export"}
    assert names["default"] >= {
        "send_email",
        "send_welcome_email",
        "kickoff_waitlist_first_email",
        "sync_contact",
        "send_waitlist_campaign_hourly",
        "check_trial_expirations",
        "sync_all_contacts",
    }
    crons = {s.job.name: (s.hour, s.minute) for s in registered["default"][1]}
    assert crons["send_waitlist_campaign_hourly"][0] is None  # every hour
    assert crons["sync_all_contacts"][0] is not None  # once a day
    assert "check_trial_expirations" in crons
    assert registered["imports"][1] == registered["exports"][1] == []

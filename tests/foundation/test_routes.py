"""The route table (worker/routes.py) against what the workers register and CONTRACT §5."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from worker import main
from worker.routes import (
    QUEUES,
    ROUTES,
    JobIdFormat,
    QueueName,
    Route,
    enqueue,
    import_continuation_job_id,
    routes_of,
    row_of_job_id,
)
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# CONTRACT §5, written out here on purpose: the table must keep these names and queues.
CONTRACT_JOBS = {
    "process_contacts_import": ("imports", False),
    "generate_contact_export": ("exports", False),
    "generate_company_export": ("exports", False),
    "send_email": ("default", False),
    "send_welcome_email": ("default", False),
    "kickoff_waitlist_first_email": ("default", False),
    "send_waitlist_campaign_hourly": ("default", True),
    "check_trial_expirations": ("default", True),
    "sync_contact": ("default", False),
    "sync_all_contacts": ("default", True),
}


@pytest.mark.parametrize("queue", QUEUES)
def test_each_queue_registers_exactly_the_routes_of_that_queue(
    queue: QueueName, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(main.JOB_MODULES_ENV, raising=False)  # the real job modules
    registered = main.worker_settings(queue, settings)
    routes = routes_of(queue)
    assert registered["queue_name"] == queue
    assert sorted(f.name for f in registered["functions"]) == sorted(r.name for r in routes)
    assert sorted(c.name for c in registered["cron_jobs"]) == sorted(
        r.name for r in routes if r.cron
    )


def test_the_table_holds_every_contract_job_on_its_queue() -> None:
    by_name = {route.name: route for route in ROUTES}
    assert len(by_name) == len(ROUTES), "a job name is in the table twice"
    assert {name: (by_name[name].queue, by_name[name].cron) for name in CONTRACT_JOBS} == (
        CONTRACT_JOBS
    )
    assert QUEUES == ("imports", "exports", "default")  # CONTRACT §4


def test_every_queue_has_one_config_and_one_worker_class() -> None:
    assert tuple(main.QUEUE_CONFIGS) == QUEUES
    assert main.WORKER_CLASS_QUEUES == {
        "ImportsWorker": "imports",
        "ExportsWorker": "exports",
        "DefaultWorker": "default",
    }


def test_job_id_formats_read_back_only_the_ids_they_build() -> None:
    formats = {route.job_ids for route in ROUTES if route.job_ids is not None}
    assert len({f.prefix for f in formats}) == len(formats), "two formats share a prefix"
    row_id = uuid.uuid4()
    for ids in formats:
        key = str(row_id) if ids.uuid_key else "k-1"
        job_id = ids.build(key)
        assert ids.key_of(job_id) == key
        assert all(other.key_of(job_id) is None for other in formats - {ids})
        # What a console shows for the job: a link to its row, or none.
        assert row_of_job_id(job_id) == (None if ids.row is None else (ids.row, row_id))
    uuid_ids = JobIdFormat("x")
    for spelling in (str(row_id).upper(), row_id.hex, f"{{{row_id}}}", ""):
        assert uuid_ids.key_of(f"x:{spelling}") is None, spelling
    assert row_of_job_id(import_continuation_job_id(row_id, 5000)) == ("import", row_id)


async def test_enqueue_puts_the_job_on_its_routes_queue(arq_redis: ArqRedis) -> None:
    route = Route("a_job", "exports")
    job = await enqueue(arq_redis, route, "a-1", value=1)
    assert job is not None and job.job_id == "a-1"
    assert [await arq_redis.zscore(queue, "a-1") is not None for queue in QUEUES] == [
        False,
        True,
        False,
    ]
    info = await job.info()
    assert info is not None and (info.function, info.kwargs) == ("a_job", {"value": 1})
    assert await enqueue(arq_redis, route, "a-1", value=2) is None  # arq keeps the first


def test_every_enqueue_in_the_code_goes_through_the_table() -> None:
    """Only `routes.enqueue` names a queue to arq; everything else passes a route."""
    direct = re.compile(r"\.enqueue_job\(|_queue_name=")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in ("worker", "jobs", "db")
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "worker" / "routes.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert offenders == []

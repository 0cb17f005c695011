"""The three arq workers, for `arq worker.main.ImportsWorker` (and Exports-, DefaultWorker).

The worker classes are built on first access from the environment (PEP 562 module
`__getattr__`), so importing this module creates nothing and reads no settings.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from arq.cron import CronJob
from arq.worker import Function

from worker import lease, preflight
from worker.job import AnyJob, CronSchedule
from worker.lifecycle import shutdown, startup
from worker.recycle import after_job_end as recycle_after_job_end
from worker.redis_connect import sentinel_arq_pool
from worker.retry import arq_max_tries
from worker.routes import QUEUES, QueueName
from worker.serialization import deserialize, serialize
from worker.settings import Settings

HEALTH_CHECK_INTERVAL_S = 10


@dataclass(frozen=True)
class QueueConfig:
    """What one queue runs and how many of its jobs one process runs at once.

    Which jobs belong to which queue is in worker/routes.py; tests/foundation/test_routes.py
    checks that these modules register exactly those.
    """

    job_modules: tuple[str, ...]
    max_jobs: int
    poll_delay_s: float
    # Seconds running jobs get to finish after SIGTERM before they are cancelled (and requeued).
    # A recycle does not cut them at all (worker/recycle.py). `max_jobs` also scales the
    # recycling count (recycle.job_limit).
    shutdown_grace_s: int


QUEUE_CONFIGS: dict[QueueName, QueueConfig] = {
    # CPU-bound parsing and one COPY stream per import: more than two per 2-core box only queue.
    "imports": QueueConfig(("jobs.imports",), max_jobs=2, poll_delay_s=0.5, shutdown_grace_s=20),
    "exports": QueueConfig(("jobs.exports",), max_jobs=4, poll_delay_s=0.5, shutdown_grace_s=20),
    # IO-bound email and sync calls: many in flight, polled often so sends start promptly.
    "default": QueueConfig(
        ("jobs.email", "jobs.marketing", "worker.reconcile"),
        max_jobs=200,
        poll_delay_s=0.1,
        shutdown_grace_s=10,
    ),
}
# ImportsWorker, ExportsWorker, DefaultWorker (CONTRACT §4).
WORKER_CLASS_QUEUES: dict[str, QueueName] = {f"{queue.title()}Worker": queue for queue in QUEUES}


# Fault tests and benchmarks run real worker processes with jobs of their own: this variable
# (comma-separated module names) replaces every queue's job modules in that process. Only
# dotted names are accepted, and only importable modules can load, as with the built-in list.
JOB_MODULES_ENV = "C360_JOB_MODULES"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def job_modules(queue: QueueName) -> tuple[str, ...]:
    override = os.environ.get(JOB_MODULES_ENV, "").strip()
    if not override:
        return QUEUE_CONFIGS[queue].job_modules
    names = tuple(name.strip() for name in override.split(",") if name.strip())
    if bad := [name for name in names if not _MODULE_NAME.match(name)]:
        raise ValueError(f"{JOB_MODULES_ENV}: not a module name: {', '.join(bad)}")
    return names


def queue_jobs(queue: QueueName) -> tuple[list[AnyJob], list[CronSchedule]]:
    """The jobs and cron schedules the queue's modules declare in `JOBS` and `CRON_JOBS`."""
    jobs: list[AnyJob] = []
    crons: list[CronSchedule] = []
    for module_name in job_modules(queue):
        module = importlib.import_module(module_name)
        jobs.extend(getattr(module, "JOBS", ()))
        crons.extend(getattr(module, "CRON_JOBS", ()))
    return jobs, crons


def worker_settings(
    queue: QueueName,
    settings: Settings,
    *,
    burst: bool = False,
    recycle: bool = False,
    jobs: list[AnyJob] | None = None,
    crons: list[CronSchedule] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `arq.Worker` serving `queue`; tests pass their own `jobs`.

    `recycle`: past the job count or WORKER_MAX_MEMORY_MB, stop taking jobs, let the running
    ones finish and exit (worker/recycle.py), ending with a SIGTERM to this process; only for
    workers that handle signals (not in-process tests).
    Raises `preflight.StartupRefused` for settings the queue must not run with.
    """
    preflight.check_settings(queue, settings)
    config = QUEUE_CONFIGS[queue]
    if jobs is None:
        jobs, declared_crons = queue_jobs(queue)
        crons = declared_crons if crons is None else crons
    functions: list[Function] = [definition.to_arq(settings) for definition in jobs]
    cron_jobs: list[CronJob] = [schedule.to_arq(settings) for schedule in crons or ()]
    return {
        "functions": functions,
        "cron_jobs": cron_jobs,
        "queue_name": queue,
        "redis_settings": settings.redis_settings(),
        "on_startup": startup,
        "on_shutdown": shutdown,
        # Short renewed in-progress leases (worker/lease.py) and recycling (worker/recycle.py).
        "on_job_start": lease.on_job_start,
        "on_job_end": lease.on_job_end,
        "after_job_end": recycle_after_job_end if recycle and not burst else None,
        "ctx": {"settings": settings, "queue_name": queue},
        "burst": burst,
        "max_jobs": config.max_jobs,
        "poll_delay": config.poll_delay_s,
        "job_timeout": settings.job_timeout_s,
        "keep_result": settings.keep_result_s,
        # MAX_RETRIES retries after the first try, plus one: our wrapper decides retries
        # itself, and a try beyond its limit only happens when the worker died on the last
        # one; JobDefinition.run then records the failure (arq would drop it silently).
        "max_tries": arq_max_tries(settings.max_retries),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "health_check_key": lease.health_check_key(queue),
        "job_completion_wait": config.shutdown_grace_s,
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "timezone": ZoneInfo("UTC"),
    }


async def _startup_for_arq_cli(ctx: dict[str, Any]) -> None:
    try:
        await startup(ctx)
    except preflight.StartupRefused as exc:
        # arq's CLI would print a traceback; the operator gets the one line. arq still closes
        # its pool (Worker.run's finally) as SystemExit leaves the event loop.
        raise SystemExit(f"error: {exc}") from None


def __getattr__(name: str) -> type:
    queue = WORKER_CLASS_QUEUES.get(name)
    if queue is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Only arq's CLI (`arq worker.main.DefaultWorker`) asks for these names, so a refusal
    # ends the process with one line, as `python -m worker` does.
    ours = Settings()
    try:
        # arq's CLI installs signal handlers, so these workers may recycle themselves.
        attributes = worker_settings(queue, ours, recycle=True)
    except preflight.StartupRefused as exc:
        raise SystemExit(f"error: {exc}") from None
    attributes["on_startup"] = _startup_for_arq_cli
    if ours.redis_sentinels:
        # arq's Worker then skips its create_pool; the pool connects on its first command.
        attributes["redis_pool"] = sentinel_arq_pool(ours, queue=queue)
    return type(name, (), attributes)

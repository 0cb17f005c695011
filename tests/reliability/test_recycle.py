"""Recycling under `python -m worker run`: by job count and by resident memory, losing nothing."""

from __future__ import annotations

from typing import Any

import psutil
import pytest
from arq.connections import ArqRedis

from tests.reliability.conftest import Db, Processes, wait_for, worker_env
from worker.recycle import Recycler
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def _run_one(arq_redis: ArqRedis, db: Db, function: str, key: str, **kwargs: Any) -> int:
    """Enqueue one job, wait until it is done; the pid of the worker that ran it."""
    await arq_redis.enqueue_job(function, key=key, _queue_name="default", **kwargs)

    async def finished() -> list[object]:
        return await db.rows("SELECT pid FROM rel_done WHERE key = :k", k=key)

    rows = await wait_for(finished, 20, f"job {key} to finish")
    return int(rows[0][0])


async def test_a_worker_recycles_after_its_job_count_and_is_replaced(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, db: Db
) -> None:
    env = worker_env(settings, worker_max_jobs_per_process=3)
    supervisor = processes.start("run", "--queue", "default", env=env)
    # One job at a time, so the count decides which process runs each.
    pids = [await _run_one(arq_redis, db, "record", f"job-{n}") for n in range(10)]
    assert len(set(pids)) == 4
    assert [pids.index(pid) for pid in pids] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    assert not any(psutil.pid_exists(pid) for pid in set(pids[:9]))
    # Nothing lost, nothing run twice: every drain was clean.
    runs = await db.rows("SELECT key, count(*) FROM rel_runs GROUP BY key")
    assert sorted(runs) == sorted((f"job-{n}", 1) for n in range(10))
    assert supervisor.poll() is None
    log = processes.log(supervisor)
    assert log.count("recycling this worker: ran 3 jobs") == 3
    assert "right after start" not in log  # a clean recycle is never treated as a crash loop


async def test_a_worker_recycles_above_its_memory_limit(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, db: Db
) -> None:
    # A worker starts at about 100 MB resident; the hog job keeps 400 MB more.
    env = worker_env(settings, worker_max_memory_mb=300)
    processes.start("run", "--queue", "default", env=env)
    before = await _run_one(arq_redis, db, "record", "before")
    hog = await _run_one(arq_redis, db, "hog_memory", "hog", mb=400)
    after = await _run_one(arq_redis, db, "record", "after")
    assert before == hog != after
    assert not psutil.pid_exists(hog)
    assert await db.done() == {"before", "hog", "after"}


def test_the_recycler_names_the_limit_it_hit() -> None:
    by_count = Recycler(max_jobs=2, max_memory_mb=100_000)
    by_count.jobs_done = 2
    assert by_count.reason() == "ran 2 jobs (WORKER_MAX_JOBS_PER_PROCESS: 2)"
    by_memory = Recycler(max_jobs=1000, max_memory_mb=1)
    reason = by_memory.reason()
    assert reason is not None and "above WORKER_MAX_MEMORY_MB=1" in reason
    assert Recycler(max_jobs=1000, max_memory_mb=100_000).reason() is None

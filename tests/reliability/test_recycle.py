"""Recycling under `python -m worker run`: by job count and by resident memory, losing nothing;
the count fitted to each queue; how far a drain lets memory grow (tests/reliability/
test_recycle_drain.py: drains that let long jobs finish)."""

from __future__ import annotations

import re
from typing import Any

import psutil
import pytest
from arq.connections import ArqRedis

from tests.conftest import RunBurst
from tests.reliability.conftest import Db, Processes, wait_for, wait_gone, worker_env
from tests.reliability.fixture_jobs import record
from worker.cli.run import MAX_DRAINING_PER_QUEUE
from worker.context import as_ctx
from worker.main import QUEUE_CONFIGS
from worker.process_info import resident_bytes
from worker.recycle import Recycler, job_limit
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]
# How long each drained worker's long job keeps it alive: past the start of the next workers.
HOLD_S = 25.0


async def _run_one(
    arq_redis: ArqRedis, db: Db, function: str, key: str, timeout_s: float = 20, **kwargs: Any
) -> int:
    """Enqueue one job, wait until it is done; the pid of the worker that ran it."""
    await arq_redis.enqueue_job(function, key=key, _queue_name="default", **kwargs)

    async def finished() -> list[object]:
        return await db.rows("SELECT pid FROM rel_done WHERE key = :k", k=key)

    rows = await wait_for(finished, timeout_s, f"job {key} to finish")
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
    for pid in set(pids[:9]):
        await wait_gone(pid, 30, f"recycled worker {pid} to exit")
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
    await wait_gone(hog, 30, "the recycled hog worker to exit")
    assert await db.done() == {"before", "hog", "after"}


def test_the_recycler_names_the_limit_it_hit() -> None:
    by_count = Recycler(max_jobs=2, max_memory_mb=100_000)
    by_count.jobs_done = 2
    assert by_count.reason() == "ran 2 jobs (WORKER_MAX_JOBS_PER_PROCESS: 2)"
    by_memory = Recycler(max_jobs=1000, max_memory_mb=1)
    reason = by_memory.reason()
    assert reason is not None and "above WORKER_MAX_MEMORY_MB=1" in reason
    assert Recycler(max_jobs=1000, max_memory_mb=100_000).reason() is None


def test_the_job_count_fits_the_queue_unless_an_operator_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WORKER_MAX_JOBS_PER_PROCESS", raising=False)
    unset = Settings()
    assert unset.worker_max_jobs_per_process == 1000  # CONTRACT §3's default, per job slot
    concurrency = {queue: config.max_jobs for queue, config in QUEUE_CONFIGS.items()}
    assert {q: job_limit(unset, n) for q, n in concurrency.items()} == {
        "imports": 2_000,
        "exports": 4_000,
        "default": 200_000,
    }
    # Set, it is taken as written, per process, on every queue: 1000 too.
    for explicit in (3, 1000):
        chosen = Settings(worker_max_jobs_per_process=explicit)
        assert {job_limit(chosen, n) for n in concurrency.values()} == {explicit}
    monkeypatch.setenv("WORKER_MAX_JOBS_PER_PROCESS", "7")
    assert job_limit(Settings(), 200) == 7


async def test_a_worker_finds_its_recycler_fitted_to_its_concurrency(
    settings: Settings, arq_redis: ArqRedis, run_burst: RunBurst, db: Db
) -> None:
    await arq_redis.enqueue_job("record", key="fit", _queue_name="default")
    worker = await run_burst("default", jobs=[record])
    assert await db.done() == {"fit"}
    recycler = as_ctx(worker.ctx)["recycler"]
    assert recycler.worker is worker
    assert recycler.max_jobs == job_limit(settings, QUEUE_CONFIGS["default"].max_jobs)
    # The drain waits as long as the longest job may run, and no longer: the tests' JOB_TIMEOUT_S
    # (60 s, uncapped for `record`) plus the 30 s arq is given past a job's own hard limit.
    assert settings.job_timeout_s == 60
    assert recycler.drain_limit_s == 60 + 30


def test_a_drain_is_cut_only_far_above_the_limit_and_where_it_began() -> None:
    recycler = Recycler(max_jobs=1, max_memory_mb=200)
    assert recycler.cut_above_mb(memory_at_start_mb=150) == 400  # twice the limit
    # Four exports at 140 MB each are a working set, not a leak: 200 MB more is.
    assert recycler.cut_above_mb(memory_at_start_mb=660) == 860


async def test_a_drain_cuts_a_job_whose_memory_runs_away(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, db: Db
) -> None:
    # The count starts the drain; the growing job then passes twice the limit while it runs.
    env = worker_env(settings, worker_max_jobs_per_process=1, worker_max_memory_mb=150)
    supervisor = processes.start("run", "--queue", "default", env=env)
    await arq_redis.enqueue_job(
        "grow_memory", key="runaway", mb=300, hold_s=600, _queue_name="default"
    )
    trigger = await _run_one(arq_redis, db, "record", "trigger")

    async def runaway_done() -> list[object]:
        return await db.rows("SELECT pid FROM rel_done WHERE key = 'runaway'")

    # Cut after the queue's grace, long before its 600 s hold: run again by the replacement.
    [(pid,)] = await wait_for(runaway_done, 40, "the runaway job to run again")
    assert pid != trigger
    assert [run[1] for run in await db.runs("runaway")] == [trigger, pid]
    log = processes.log(supervisor)
    assert re.search(r"MB passed [0-9]+ MB while draining; cancelling the running jobs", log)
    await wait_gone(trigger, 30, "the worker that cut the runaway job to exit")


def test_resident_memory_is_read_as_psutil_reads_it() -> None:
    before = psutil.Process().memory_info().rss
    ours = resident_bytes()
    after = psutil.Process().memory_info().rss
    # The same /proc figure: between the two psutil reads, to the page, give or take a
    # little memory allocated in between.
    assert min(before, after) - 1024 * 1024 <= ours <= max(before, after) + 1024 * 1024
    kept = b"\x01" * (64 * 1024 * 1024)
    assert resident_bytes() >= ours + 60 * 1024 * 1024  # a later read sees new pages
    del kept


@pytest.mark.timeout(120)
async def test_workers_over_their_memory_limit_from_the_start_do_not_pile_up(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, db: Db
) -> None:
    # A worker holds about 100 MB at rest: above this limit, each drains after its first job.
    env = worker_env(settings, worker_max_memory_mb=50)
    supervisor = processes.start("run", "--queue", "default", env=env)
    quick_pids = []
    for n in range(MAX_DRAINING_PER_QUEUE + 2):
        # The long job keeps the draining worker alive; the quick one starts the drain.
        await arq_redis.enqueue_job(
            "record", key=f"hold-{n}", first_run_sleep_s=HOLD_S, _queue_name="default"
        )
        # The last waits for a drained worker to exit: for its long job to end.
        quick_pids.append(await _run_one(arq_redis, db, "record", f"quick-{n}", HOLD_S + 30))
    assert len(set(quick_pids)) == len(quick_pids)  # each worker ran one pair, then drained
    # With two still draining, the next drain's replacement waited for the first to exit.
    first_hold = await db.rows("SELECT done_at FROM rel_done WHERE key = 'hold-0'")
    assert first_hold, "a worker started while three recycled ones were still draining"
    [(first_hold_done,)] = first_hold
    [(last_quick_done,)] = await db.rows(
        "SELECT done_at FROM rel_done WHERE key = :k", k=f"quick-{MAX_DRAINING_PER_QUEUE + 1}"
    )
    assert first_hold_done < last_quick_done
    await wait_gone(quick_pids[0], 30, "the first drained worker to exit")
    log = processes.log(supervisor)
    # One error for the whole run of such workers, naming the limit to raise.
    assert log.count("passed WORKER_MAX_MEMORY_MB=50") == 1, log
    assert "the next starts when one of them exits" in log
    assert supervisor.poll() is None

"""Outages: Redis restarted under running workers; PostgreSQL connections terminated mid-job."""

from __future__ import annotations

import asyncio

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.reliability.conftest import Db, PrivateRedis, Processes, wait_for, worker_env
from worker.serialization import deserialize, serialize
from worker.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]
JOBS = 30


async def test_redis_restart_mid_run_loses_and_doubles_nothing(
    settings: Settings, processes: Processes, private_redis: PrivateRedis, db: Db
) -> None:
    env = worker_env(settings, redis_url=private_redis.url)
    supervisor = processes.start("run", "--queue", "default", env=env)
    pool = await create_pool(
        RedisSettings.from_dsn(private_redis.url),
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    try:
        for n in range(JOBS):
            # Half are running when Redis dies, half still queued behind a deferral.
            await pool.enqueue_job(
                "record", key=f"k{n}", sleep_s=0.2, first_run_sleep_s=2,
                _job_id=f"k{n}", _queue_name="default", _defer_by=0 if n % 2 else 1.5,
            )  # fmt: skip
        await wait_for(
            lambda: db.scalar("SELECT count(DISTINCT key) >= 10 FROM rel_runs"), 20, "jobs to run"
        )
        private_redis.kill()
        await asyncio.sleep(1.0)
        await private_redis.start()  # from its AOF: the queue and the leases come back

        async def all_done() -> bool:
            return len(await db.done()) == JOBS

        await wait_for(all_done, 45, "every job to complete after the restart", every_s=0.5)
        assert await db.done() == {f"k{n}" for n in range(JOBS)}
        await wait_for(lambda: _drained(pool), 10, "the queue to drain")
        assert supervisor.poll() is None
        log = processes.log(supervisor)
        assert "lost Redis" in log  # the worker exited with Redis and was replaced
        assert log.count("started default worker") >= 2
    finally:
        await pool.aclose()


async def _drained(pool: ArqRedis) -> bool:
    return int(await pool.zcard("default")) == 0


async def test_terminated_postgres_connections_are_retried_to_completion(
    settings: Settings, processes: Processes, arq_redis: ArqRedis, engine: AsyncEngine, db: Db
) -> None:
    keys = [f"w{n}" for n in range(5)]
    for key in keys:
        await arq_redis.enqueue_job("db_hold", key=key, hold_s=3, _queue_name="default")
    worker = processes.start("work", "default", "--burst", env=worker_env(settings))
    database = settings.database.database
    sleeping = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = :db AND query LIKE '%pg_sleep%'"
        " AND state = 'active' AND pid <> pg_backend_pid()"
    )
    await wait_for(
        lambda: db.scalar(sleeping + " HAVING count(*) = 5", db=database), 20, "5 open writes"
    )
    async with engine.connect() as connection:
        terminated = await connection.scalar(
            text(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :db AND query LIKE '%pg_sleep%' AND state = 'active'"
                " AND pid <> pg_backend_pid()) AS t"
            ),
            {"db": database},
        )
    assert terminated == 5
    assert await processes.wait_exit(worker, 30) == 0, processes.log(worker)
    assert await db.done() == set(keys)
    tries = await db.rows("SELECT key, array_agg(try ORDER BY try) FROM rel_runs GROUP BY key")
    assert sorted(tries) == [(key, [1, 2]) for key in keys]

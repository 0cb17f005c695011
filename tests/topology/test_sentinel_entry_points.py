"""Every entry point reaches Redis through Sentinel: one real round trip each, on the master.

The cluster's data nodes are read directly to prove where each write went; the tests' usual
Redis (TEST_REDIS_DB) must stay untouched by all of them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.reliability.conftest import REPO_ROOT, worker_env
from tests.topology.conftest import (
    DATA_PASSWORD,
    SENTINEL_PASSWORD,
    SentinelCluster,
    running_cluster,
    sentinel_env,
)
from worker.client import JobsClient
from worker.ratelimit import RateLimiter
from worker.redis_connect import arq_pool, redis_client
from worker.settings import Settings
from worker.web.console import create_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
Sessions = async_sessionmaker[AsyncSession]
METRICS_TOKEN = "scrape-token-Sn71"


@pytest.fixture(scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SentinelCluster]:
    """One cluster for the module (none of these tests fails it over), emptied before each."""
    async with running_cluster(tmp_path_factory.mktemp("sentinel")) as built:
        yield built


@pytest.fixture(autouse=True)
async def empty_cluster(cluster: SentinelCluster) -> None:
    primary = cluster.node(cluster.primary_port)
    try:
        await primary.flushall()  # the cluster's own primary, never the tests' usual Redis
        await primary.wait(1, 2000)  # the replica too
    finally:
        await primary.aclose()


async def queued(cluster: SentinelCluster, queue: str) -> tuple[int, int]:
    """(on the primary, on the replica): how many jobs wait on `queue`."""
    primary, replica = cluster.node(cluster.primary_port), cluster.node(cluster.replica_port)
    try:
        return int(await primary.zcard(queue)), int(await replica.zcard(queue))
    finally:
        await primary.aclose()
        await replica.aclose()


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m worker ARGS` in a child process (off the event loop)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_jobs_client_enqueues_on_the_master_the_sentinels_name(
    sentinel_settings: Settings, cluster: SentinelCluster, redis_raw: aioredis.Redis
) -> None:
    async with JobsClient.from_settings(sentinel_settings) as jobs:
        enqueued = await jobs.send_email("ann@example.com", "Hi", "<p>Hi</p>")
        assert enqueued.job_id is not None
        assert await jobs.redis.exists(f"arq:job:{enqueued.job_id}") == 1

    async def replicated() -> bool:
        return await queued(cluster, "default") == (1, 1)

    for _ in range(50):
        if await replicated():
            break
        await asyncio.sleep(0.1)
    assert await queued(cluster, "default") == (1, 1)
    assert await redis_raw.zcard("default") == 0  # not the tests' usual Redis


async def test_a_worker_process_runs_the_job_through_sentinel(
    settings: Settings, sentinel_settings: Settings, cluster: SentinelCluster, sessions: Sessions
) -> None:
    async with JobsClient.from_settings(sentinel_settings) as jobs:
        await jobs.send_email("bo@example.com", "Hello", "<p>Hello</p>", idempotency_key="e1")
    env = {**worker_env(settings, c360_job_modules=""), **sentinel_env(cluster)}
    done = await cli(env, "work", "default", "--burst")
    assert done.returncode == 0, done.stdout + done.stderr
    async with sessions() as session:
        status = await session.scalar(text("SELECT status FROM email_messages"))
    assert status == "sent"  # the console provider's "sent"
    assert (await queued(cluster, "default"))[0] == 0


async def test_arqs_own_cli_runs_the_job_through_sentinel(
    settings: Settings, sentinel_settings: Settings, cluster: SentinelCluster, sessions: Sessions
) -> None:
    async with JobsClient.from_settings(sentinel_settings) as jobs:
        await jobs.send_email("cy@example.com", "Hey", "<p>Hey</p>", idempotency_key="e2")
    env = {**worker_env(settings, c360_job_modules=""), **sentinel_env(cluster)}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "arq", "worker.main.DefaultWorker", "--burst"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    async with sessions() as session:
        status = await session.scalar(text("SELECT status FROM email_messages"))
    assert status == "sent"


async def test_cli_status_and_health_read_the_master(
    settings: Settings, sentinel_settings: Settings, cluster: SentinelCluster
) -> None:
    async with JobsClient.from_settings(sentinel_settings) as jobs:
        for n in range(3):
            await jobs.send_email(f"c{n}@example.com", "S", "<p>S</p>")
    env = {**worker_env(settings), **sentinel_env(cluster)}
    status = await cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queues"]["default"]["queued"] == 3
    health = await cli(env, "health", "--queue", "default")
    assert (health.returncode, health.stdout.strip()) == (1, "no live default worker on this host")
    # With the Sentinels gone, status names where it looked, and no password.
    broken = {**env, "REDIS_SENTINELS": f"127.0.0.1:{cluster.primary_port}"}
    failed = await cli(broken, "status", "--json")
    assert failed.returncode == 1
    assert "cannot read Redis at master 'c360test' via Sentinels" in failed.stderr
    assert DATA_PASSWORD not in failed.stderr and SENTINEL_PASSWORD not in failed.stderr


async def test_rate_limiter_and_plain_clients_use_the_master(
    sentinel_settings: Settings, cluster: SentinelCluster
) -> None:
    pool = await arq_pool(sentinel_settings)
    try:
        limiter = RateLimiter(pool, rate_per_s=0.5, key_prefix="c360:test-sentinel-rate")
        assert await limiter.try_acquire() == 0.0
        assert await limiter.try_acquire() > 0  # the slot taken above is seen by the next call
    finally:
        await pool.aclose()
    primary = cluster.node(cluster.primary_port)
    client = redis_client(sentinel_settings, timeout_s=2)
    try:
        assert await primary.exists("c360:test-sentinel-rate:tat") == 1
        await client.set("c360:test-plain", "1")
        assert await primary.get("c360:test-plain") == b"1"
    finally:
        await primary.aclose()
        await client.aclose()


async def test_console_reads_the_master_through_sentinel(
    sentinel_settings: Settings, cluster: SentinelCluster
) -> None:
    console_settings = Settings(
        **{
            **sentinel_settings.model_dump(),
            "console_password": "console-pw-Sn22",
            "metrics_token": METRICS_TOKEN,
        }
    )
    async with JobsClient.from_settings(sentinel_settings) as jobs:
        await jobs.send_email("dee@example.com", "M", "<p>M</p>")
    app = create_app(console_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c.test") as c,
    ):
        metrics = await c.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert metrics.status_code == 200
        assert 'c360_queue_jobs{queue="default",state="queued"} 1.0' in metrics.text
        login = await c.post("/login", data={"username": "admin", "password": "console-pw-Sn22"})
        assert login.status_code == 303

"""Fault-test rig: real worker processes, a private Redis server, and polling with deadlines.

Worker processes load only `tests.reliability.fixture_jobs` (`C360_JOB_MODULES`), talk to the
session's test database and to the tests' Redis database (or a private `redis-server`), and
are killed by process group when the test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.reliability.fixture_jobs import FIXTURE_DDL, FIXTURE_TABLES
from worker.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_MODULES = "tests.reliability.fixture_jobs"


@pytest.fixture(autouse=True)
async def fixture_tables(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as session:
        for statement in FIXTURE_DDL:
            await session.execute(text(statement))
        await session.execute(text(f"TRUNCATE {FIXTURE_TABLES}"))


async def wait_for(
    check: Callable[[], Awaitable[Any]], timeout_s: float, what: str, every_s: float = 0.1
) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(every_s)


def gone(pid: int) -> bool:
    """Whether process `pid` has exited: no such process, or a zombie its parent (a `run`
    supervisor) has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, timeout_s: float, what: str) -> None:
    """Wait until `pid` has exited. A recycled worker exits a moment after its replacement has
    already taken the next job, so a check right after that job would race the exit."""

    async def exited() -> bool:
        return gone(pid)

    await wait_for(exited, timeout_s, what)


class Db:
    """Small read helpers over the fixture tables."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.sessions() as session:
            return list((await session.execute(text(sql), params)).all())

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.sessions() as session:
            return await session.scalar(text(sql), params)

    async def runs(self, key: str) -> list[Any]:
        return await self.rows(
            "SELECT try, pid, started_at FROM rel_runs WHERE key = :k ORDER BY started_at", k=key
        )

    async def done(self) -> set[str]:
        return {row[0] for row in await self.rows("SELECT key FROM rel_done")}


@pytest.fixture
def db(sessions: async_sessionmaker[AsyncSession]) -> Db:
    return Db(sessions)


def worker_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "C360_JOB_MODULES": FIXTURE_MODULES,
        "EMAIL_PROVIDER": "console",  # required by default workers (worker/preflight.py)
        "PYTHONPATH": str(REPO_ROOT),
        "LOG_LEVEL": "INFO",
        "MAX_RETRIES": "3",
        "RETRY_BASE_DELAY_S": "0.1",
        # Production limits: recovery must not depend on a job's own timeout.
        "JOB_TIMEOUT_S": "1800",
        "JOB_SOFT_TIMEOUT_S": "1500",
    }
    env.update({name.upper(): str(value) for name, value in overrides.items()})
    return env


class Processes:
    """Worker processes started by one test; each in its own process group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(self, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"proc-{len(self.started)}.log"
        with log_path.open("wb") as log_file:  # the child keeps its own copy of the fd
            process = subprocess.Popen(
                [sys.executable, "-m", "worker", *args],
                env=env,
                cwd=REPO_ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs[process.pid] = log_path
        self.started.append(process)
        return process

    def log(self, process: subprocess.Popen[bytes]) -> str:
        return self.logs[process.pid].read_text(errors="replace")

    async def wait_exit(self, process: subprocess.Popen[bytes], timeout_s: float) -> int:
        async def exited() -> bool:
            return process.poll() is not None

        await wait_for(exited, timeout_s, f"pid {process.pid} to exit")
        return process.returncode

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                # The group: a `run` supervisor's worker children too.
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # orphaned children, if any


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.kill_all()


async def worker_ready(redis: aioredis.Redis, queue: str, pid: int) -> bool:
    """True once the worker with `pid` has written its first heartbeat (it polls the queue)."""
    async for _ in redis.scan_iter(match=f"{queue}:health-check:*:{pid}", count=10_000):
        return True
    return False


async def worker_pids(redis: aioredis.Redis, queue: str) -> set[int]:
    return {
        int(key.rsplit(b":", 1)[1])
        async for key in redis.scan_iter(match=f"{queue}:health-check:*", count=10_000)
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own on a loopback port, with an AOF it can restart from."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> None:
        self.process = subprocess.Popen(
            # appendfsync always: a SIGKILLed server loses nothing it acknowledged.
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def start(self) -> None:
        self._spawn()
        client = aioredis.Redis.from_url(self.url)

        async def answers() -> bool:
            try:
                return bool(await client.ping())
            except Exception:
                return False

        try:
            await wait_for(answers, 10, "the private redis-server to answer")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    server.kill()

"""A Redis primary, a replica and three Sentinels of the test's own, on free loopback ports.

Real `redis-server` and `redis-sentinel` processes (Debian's packages) in a temp dir, with
passwords on all of them (REDIS_URL's for the data nodes, REDIS_SENTINEL_PASSWORD's for the
Sentinels), and short timings so a failover takes a few seconds: the primary is down after
`DOWN_AFTER_MS` without an answer. `sentinel_settings` are the session's settings pointed at the
Sentinels. Everything is killed at teardown, whatever happened.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.reliability.conftest import free_port, wait_for
from worker.settings import Settings

MASTER_NAME = "c360test"
DATA_PASSWORD = "data-pw-8Hq2"
SENTINEL_PASSWORD = "sentinel-pw-Lw41"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 6000
QUORUM = 2


class SentinelCluster:
    """`primary`, `replica` and three Sentinels; `kill_primary` starts a real failover."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.primary_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> str:
        """The `REDIS_SENTINELS` value."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.root / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child has its own copy

    def _data_node(self, name: str, port: int, *extra: str) -> None:
        home = self.root / name
        home.mkdir()
        self._spawn(
            name,
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home),
             "--save", "", "--appendonly", "no", "--requirepass", DATA_PASSWORD,
             "--masterauth", DATA_PASSWORD, *extra],
        )  # fmt: skip

    def _sentinel(self, index: int, port: int) -> None:
        home = self.root / f"sentinel-{index}"
        home.mkdir()
        config = home / "sentinel.conf"  # Sentinel rewrites it: one file each
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {home}\n"
            f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary_port} {QUORUM}\n"
            f"sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self._spawn(f"sentinel-{index}", ["redis-sentinel", str(config)])

    def node(self, port: int) -> aioredis.Redis:
        """A direct client of one data node (to look behind Sentinel's back)."""
        return aioredis.Redis(host="127.0.0.1", port=port, password=DATA_PASSWORD)

    def sentinel(self, port: int) -> aioredis.Redis:
        return aioredis.Redis(host="127.0.0.1", port=port, password=SENTINEL_PASSWORD)

    async def start(self) -> None:
        self._data_node("primary", self.primary_port)
        # Writable, so a test can make it miss writes the primary took (see test_failover.py).
        self._data_node(
            "replica", self.replica_port,
            "--replicaof", "127.0.0.1", str(self.primary_port), "--replica-read-only", "no",
        )  # fmt: skip
        for index, port in enumerate(self.sentinel_ports):
            self._sentinel(index, port)
        await wait_for(self._agreed, 30, "three Sentinels to agree on the primary and replica")

    async def _agreed(self) -> bool:
        if not await self._replica_in_sync():
            return False
        for port in self.sentinel_ports:
            state = await self._master_state(port)
            if state is None or state.get("ip") != "127.0.0.1":
                return False
            if (state.get("port"), state.get("num-other-sentinels"), state.get("num-slaves")) != (
                self.primary_port,
                2,
                1,
            ) or state.get("flags") != "master":
                return False
        return True

    async def _replica_in_sync(self) -> bool:
        client = self.node(self.replica_port)
        try:
            info = await client.info("replication")
        except Exception:
            return False
        finally:
            await client.aclose()
        return bool(info.get("master_link_status") == "up")

    async def _master_state(self, port: int) -> dict[str, object] | None:
        client = self.sentinel(port)
        try:
            # redis-py's Sentinel commands are not annotated.
            masters = await client.sentinel_masters()  # type: ignore[no-untyped-call]
        except Exception:
            return None
        finally:
            await client.aclose()
        state = masters.get(MASTER_NAME)
        return dict(state) if state is not None else None

    async def master_port(self, sentinel_port: int) -> int | None:
        """The master's port as one Sentinel names it now."""
        client = self.sentinel(sentinel_port)
        try:
            found = await client.sentinel_get_master_addr_by_name(  # type: ignore[no-untyped-call]
                MASTER_NAME
            )
        except Exception:
            return None
        finally:
            await client.aclose()
        return int(found[1]) if found else None

    def kill_primary(self) -> None:
        primary = self.processes["primary"]
        primary.kill()  # SIGKILL: no goodbye to the replica or the clients
        primary.wait(5)

    async def failed_over(self) -> bool:
        """True once every Sentinel names the replica as the master."""
        for port in self.sentinel_ports:
            if await self.master_port(port) != self.replica_port:
                return False
        client = self.node(self.replica_port)
        try:
            role = (await client.info("replication")).get("role")
        finally:
            await client.aclose()
        return bool(role == "master")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(5)


@contextlib.asynccontextmanager
async def running_cluster(root: Path) -> AsyncIterator[SentinelCluster]:
    built = SentinelCluster(root)
    try:
        await built.start()
        yield built
    finally:
        built.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SentinelCluster]:
    """A fresh cluster for one test (one that fails over)."""
    async with running_cluster(tmp_path) as built:
        yield built


def through_sentinel(settings: Settings, cluster: SentinelCluster) -> Settings:
    """`settings` with Redis reached through the cluster's Sentinels (database 0).

    REDIS_URL's host is never used then: it carries the database number and the password.
    """
    return Settings(
        **{
            **settings.model_dump(),
            "redis_url": f"redis://:{DATA_PASSWORD}@sentinel-named-master/0",
            "redis_sentinels": cluster.sentinels,
            "redis_sentinel_master": MASTER_NAME,
            "redis_sentinel_password": SENTINEL_PASSWORD,
        }
    )


@pytest.fixture
def sentinel_settings(settings: Settings, cluster: SentinelCluster) -> Settings:
    return through_sentinel(settings, cluster)


def sentinel_env(cluster: SentinelCluster) -> dict[str, str]:
    """The environment variables that make a process reach Redis through the cluster."""
    return {
        "REDIS_URL": f"redis://:{DATA_PASSWORD}@sentinel-named-master/0",
        "REDIS_SENTINELS": cluster.sentinels,
        "REDIS_SENTINEL_MASTER": MASTER_NAME,
        "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
    }

"""The soak's own world: nothing it starts or breaks is shared with anything else on the machine.

- PostgreSQL: a database of its own (`c360_chaos_<hex>`) on the local server, created and
  migrated here, dropped at the end unless `--keep`. Faults only ever touch its backends.
- Redis: a `redis-server` on a free loopback port, without persistence (`--save ""`, no AOF),
  so a restart comes back empty: the harsher case, repaired from PostgreSQL by the reconciler.
  127.0.0.1:6379 is never touched.
- The fake Resend and SendGrid (tests/support/provider_server.py) in a thread of this process,
  and moto's S3 server in a child process, both on loopback.
- IMPORT_DIR, EXPORT_DIR and the workers' TMPDIR in one temporary directory, so files left
  behind by killed workers can be counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from sqlalchemy.engine import make_url

from db.migrate import upgrade
from tests.support.provider_server import ProviderServer

ROOT = Path(__file__).resolve().parents[2]
PG_SERVER = os.environ.get("CHAOS_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
BUCKET = "chaos"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "chaos",
    "AWS_SECRET_ACCESS_KEY": "chaos",
    "AWS_DEFAULT_REGION": "us-east-1",
}
FAKE_API_KEY = "re_chaos_" + "x" * 24  # the fake accepts any key; never a real one


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check():
                return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout_s:g} s")


class PrivateRedis:
    """A redis-server of the soak's own; `restart()` is kill -9 and an empty start."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def start(self) -> None:
        self._spawn()
        client = aioredis.Redis.from_url(self.url)
        try:
            await wait_until(client.ping, 10, f"redis-server on port {self.port}")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


class MotoServer:
    """moto's S3 server in a child process (its own GIL, not the soak driver's)."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **AWS_ENV},
            )  # fmt: skip

    async def start(self) -> None:
        self._spawn()

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        async def up() -> bool:
            return await asyncio.to_thread(listening)

        await wait_until(up, 30, "moto's S3 server")

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class Environment:
    """Everything the soak provisioned; `close()` removes it (the database unless `keep`)."""

    base_dir: Path
    database: str
    redis: PrivateRedis
    moto: MotoServer
    provider: ProviderServer
    storage_backend: str = "s3"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def import_dir(self) -> Path:
        return self.base_dir / "imports"

    @property
    def export_dir(self) -> Path:
        return self.base_dir / "exports"

    @property
    def worker_tmp(self) -> Path:
        return self.base_dir / "worker-tmp"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "logs"

    @property
    def dsn(self) -> str:
        return f"{PG_SERVER}/{self.database}"

    @property
    def database_url(self) -> str:
        return self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    def settings_env(self) -> dict[str, str]:
        """The settings every process of the soak runs with (CONTRACT §3 names)."""
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis.url,
            "IMPORT_DIR": str(self.import_dir),
            "EXPORT_DIR": str(self.export_dir),
            "STORAGE_BACKEND": self.storage_backend,
            "S3_BUCKET": BUCKET,
            "S3_ENDPOINT_URL": self.moto.endpoint_url,
            "S3_REGION": AWS_ENV["AWS_DEFAULT_REGION"],
            "EMAIL_PROVIDER": "resend",
            "EMAIL_API_KEY": FAKE_API_KEY,
            "EMAIL_API_BASE_URL": self.provider.base_url,
            # The fake has no rate limit; the contract's default of 10/s would make 20,000
            # emails take half an hour. Workers, not the limiter, are the bound here.
            "EMAIL_RATE_LIMIT_PER_S": "1000",
            "MARKETING_PROVIDER": "sendgrid",
            "MARKETING_API_KEY": FAKE_API_KEY,
            "MARKETING_API_BASE_URL": self.provider.base_url,
            "APP_URL": "http://127.0.0.1:9",  # only printed into links; never requested
            "SECRET_KEY": self.secret_key,
            "WAITLIST_CONFIRM": "false",  # step 1 at sign-up: every signup is one email
        }

    def worker_env(self, retry_base_delay_s: float) -> dict[str, str]:
        return {
            **os.environ,
            **AWS_ENV,
            **self.settings_env(),
            # Compressed time: the contract's 60 s base backoff would outlast the soak. The
            # retry count stays the contract's default (MAX_RETRIES=3).
            "RETRY_BASE_DELAY_S": str(retry_base_delay_s),
            "TMPDIR": str(self.worker_tmp),
            "PYTHONPATH": str(ROOT),
            "LOG_LEVEL": "WARNING",
        }


async def provision(storage_backend: str) -> Environment:
    base_dir = Path(tempfile.mkdtemp(prefix="c360-chaos-"))
    database = f"c360_chaos_{uuid.uuid4().hex[:8]}"
    redis_server = PrivateRedis(base_dir / "redis")
    moto = MotoServer(base_dir / "moto.log")
    provider = ProviderServer()
    env = Environment(base_dir, database, redis_server, moto, provider, storage_backend)
    for path in (
        env.import_dir,
        env.export_dir,
        env.worker_tmp,
        env.log_dir,
        redis_server.data_dir,
    ):
        path.mkdir(parents=True, exist_ok=True)
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    await upgrade(make_url(env.database_url))
    await redis_server.start()
    await moto.start()
    await asyncio.to_thread(moto.client().create_bucket, Bucket=BUCKET)
    provider.start()
    return env


async def teardown(env: Environment, *, keep: bool) -> None:
    env.provider.stop()
    env.moto.stop()
    env.redis.kill()
    if keep:
        print(f"kept: database {env.database}, files and logs in {env.base_dir}")
        return
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{env.database}" WITH (FORCE)')
    finally:
        await admin.close()
    shutil.rmtree(env.base_dir, ignore_errors=True)

"""PgBouncer in transaction pooling mode, as a real process of the tests' own.

Debian's `pgbouncer` (1.18: no protocol-level prepared statements) listens on a free loopback
port with `pool_mode = transaction` and a server pool of `POOL_SIZE` connections per database,
fewer than the clients the tests open. `*` forwards any database name to the local trust
PostgreSQL, so the session's test database (migrated directly, by the root conftest) is
reached through it under its own name; `DUO_DATABASE` is an alias of that database with a
pool of two server connections, so a test can tell which one a transaction gets.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.session import create_engine, make_sessionmaker
from tests.reliability.conftest import free_port
from worker.client import JobsClient
from worker.settings import Settings

POOL_SIZE = 3
DUO_DATABASE = "c360_duo"
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@dataclass(frozen=True)
class PgBouncer:
    port: int
    database: str  # the test database, reached through the pooler under its own name
    log_path: Path

    def url(self, database: str | None = None) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database or self.database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def write_config(directory: Path, port: int, database: str, pg_port: int) -> Path:
    (directory / "userlist.txt").write_text('"postgres" ""\n')
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        "\n".join(
            [
                "[databases]",
                f"{DUO_DATABASE} = host=127.0.0.1 port={pg_port} dbname={database} pool_size=2",
                f"* = host=127.0.0.1 port={pg_port}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {directory / 'userlist.txt'}",
                "admin_users = postgres",
                "pool_mode = transaction",
                f"default_pool_size = {POOL_SIZE}",
                "reserve_pool_size = 0",
                "max_client_conn = 500",
                # A client that waits this long for a server fails instead of hanging the test.
                "query_wait_timeout = 30",
                f"logfile = {directory / 'pgbouncer.log'}",
                "",
            ]
        )
    )
    return ini


async def _answers(port: int) -> bool:
    try:
        connection = await asyncpg.connect(
            host="127.0.0.1", port=port, user="postgres", database="pgbouncer",
            statement_cache_size=0, timeout=1,
        )  # fmt: skip
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False
    await connection.close()
    return True


def start_pgbouncer(directory: Path, ini: Path) -> subprocess.Popen[bytes]:
    """PgBouncer refuses to run as root: under root (containers, CI) it switches to an
    unprivileged user (`-u`), which must be able to read its files."""
    command = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
        for path in (directory, *directory.iterdir()):
            shutil.chown(path, user=user)
        command += ["-u", user]
    with (directory / "stderr.log").open("wb") as stderr:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
async def pgbouncer(settings: Settings) -> AsyncIterator[PgBouncer]:
    # Not under pytest's tmp_path: its parents are private to the user running the tests.
    directory = Path(tempfile.mkdtemp(prefix="c360-pgbouncer-"))
    port = free_port()
    database = settings.database.database or ""
    ini = write_config(directory, port, database, settings.database.port or 5432)
    process = start_pgbouncer(directory, ini)
    bouncer = PgBouncer(port, database, directory / "pgbouncer.log")
    try:
        deadline = time.monotonic() + 10
        while not await _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = (directory / "stderr.log").read_text(errors="replace")
                pytest.fail(f"pgbouncer did not start:\n{stderr}")
            await asyncio.sleep(0.05)
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pooled_settings(settings: Settings, pgbouncer: PgBouncer) -> Settings:
    """The test settings with DATABASE_URL at PgBouncer and DATABASE_POOLER=pgbouncer."""
    return settings.model_copy(
        update={"database_url": pgbouncer.url(), "database_pooler": "pgbouncer"}
    )


@pytest.fixture
async def pooled_sessions(
    pooled_settings: Settings,
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(pooled_settings.database, pooler="pgbouncer")
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
def pooled_client(
    arq_redis: ArqRedis,
    pooled_sessions: async_sessionmaker[AsyncSession],
    pooled_settings: Settings,
) -> JobsClient:
    """A web app's client whose every statement goes through PgBouncer."""
    return JobsClient(redis=arq_redis, sessions=pooled_sessions, settings=pooled_settings)

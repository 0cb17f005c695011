"""A PgBouncer process of our own in transaction pooling mode, for tests and benchmarks.

Debian's `pgbouncer` with a config written to a fresh directory: a loopback port of its own,
`pool_mode = transaction`, `*` forwarding every database name to one PostgreSQL, trust auth
(the local servers here trust loopback). PgBouncer refuses to run as root: under root it
switches to an unprivileged user (`-u`), which then owns the directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@dataclass(frozen=True)
class PgBouncerProcess:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]

    def stderr(self) -> str:
        return (self.directory / "stderr.log").read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def config(
    directory: Path, port: int, pg_port: int, pool_size: int, aliases: dict[str, str]
) -> Path:
    """pgbouncer.ini (and its userlist) in `directory`; `aliases`: name -> extra database line
    options (`dbname=... pool_size=...`), listed before the `*` entry."""
    (directory / "userlist.txt").write_text('"postgres" ""\n')
    ini = directory / "pgbouncer.ini"
    lines = [
        "[databases]",
        *(f"{name} = host=127.0.0.1 port={pg_port} {extra}" for name, extra in aliases.items()),
        f"* = host=127.0.0.1 port={pg_port}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {directory / 'userlist.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {pool_size}",
        "reserve_pool_size = 0",
        "max_client_conn = 500",
        # A client that waits this long for a server connection fails instead of hanging.
        "query_wait_timeout = 30",
        f"logfile = {directory / 'pgbouncer.log'}",
        "",
    ]
    ini.write_text("\n".join(lines))
    return ini


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@contextlib.contextmanager
def pgbouncer(
    *, pg_port: int = 5432, pool_size: int = 3, aliases: dict[str, str] | None = None
) -> Iterator[PgBouncerProcess]:
    """A running PgBouncer, stopped (and its directory removed) on exit."""
    # Not under pytest's tmp_path: its parents are private to the user running the tests.
    directory = Path(tempfile.mkdtemp(prefix="c360-pgbouncer-"))
    port = free_port()
    ini = config(directory, port, pg_port, pool_size, aliases or {})
    command = [PGBOUNCER, str(ini)]
    if os.geteuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
        for path in (directory, *directory.iterdir()):
            shutil.chown(path, user=user)
        command += ["-u", user]
    with (directory / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    running = PgBouncerProcess(port, directory, process)
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start:\n{running.stderr()}")
            time.sleep(0.05)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

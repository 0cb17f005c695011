"""Workers refuse to start wrongly, in one line: no email provider (M7), Redis older than 7 (L4)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis

from tests.conftest import RunBurst
from tests.support.fake_redis_server import FakeRedisServer
from worker.client import JobsClient
from worker.preflight import StartupRefused, check_redis
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
NO_PROVIDER = "EMAIL_PROVIDER is not set, and the default queue sends email"


def operator_env(settings: Settings, tmp_path: Path, **extra: str) -> dict[str, str]:
    """What an operator's shell would hold: the services, and no EMAIL_PROVIDER at all."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "IMPORT_DIR": str(settings.import_dir),
        "EXPORT_DIR": str(settings.export_dir),
        **extra,
    }


async def run_command(args: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    # Async: a test's fake server answers on this event loop while the command runs.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, (stdout + stderr).decode().strip().splitlines()


# ---- M7: no silent email sink -----------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "worker", "work", "default", "--burst"],
        ["-m", "worker", "run", "--burst"],
        ["-m", "arq", "worker.main.DefaultWorker", "--burst"],
    ],
    ids=["work-default", "run", "arq-cli"],
)
async def test_a_default_worker_without_email_provider_refuses_in_one_line(
    settings: Settings, tmp_path: Path, command: list[str]
) -> None:
    code, lines = await run_command(command, operator_env(settings, tmp_path))
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {NO_PROVIDER}: set it to resend or sendgrid"), lines


async def test_the_default_worker_refuses_in_process_too(
    settings: Settings, run_burst: RunBurst
) -> None:
    with pytest.raises(StartupRefused, match=NO_PROVIDER):
        await run_burst("default", settings_=settings.model_copy(update={"email_provider": None}))


async def test_imports_exports_and_the_client_need_no_email_provider(
    settings: Settings, run_burst: RunBurst, tmp_path: Path
) -> None:
    no_provider = settings.model_copy(update={"email_provider": None})
    await run_burst("imports", settings_=no_provider)
    await run_burst("exports", settings_=no_provider)
    code, lines = await run_command(
        ["-m", "worker", "work", "imports", "--burst"], operator_env(settings, tmp_path)
    )
    assert code == 0, lines
    # A web app's client, built from an environment without EMAIL_PROVIDER.
    async with JobsClient.from_settings(no_provider) as jobs:
        enqueued = await jobs.send_email("ada@example.com", "Hi", "<p>Hi</p>")
    assert enqueued.job_id


async def test_make_run_sets_the_console_provider_explicitly() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert 'EMAIL_PROVIDER="$${EMAIL_PROVIDER:-console}" $(PY) -m worker run' in recipe


# ---- L4: Redis >= 7 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "worker", "work", "imports", "--burst"],
        ["-m", "worker", "run", "--queue", "imports", "--burst"],
        ["-m", "arq", "worker.main.ImportsWorker", "--burst"],
    ],
    ids=["work", "run", "arq-cli"],
)
async def test_a_worker_refuses_redis_6_in_one_line(
    settings: Settings, tmp_path: Path, command: list[str]
) -> None:
    async with FakeRedisServer("6.2.14") as old_redis:
        env = operator_env(settings, tmp_path, REDIS_URL=old_redis.url)
        code, lines = await run_command(command, env)
    assert code != 0
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if "error" in line.lower()]
    # arq's CLI and the worker log their INFO lines first; the refusal is the one error, last.
    assert errors == [lines[-1]], lines
    assert lines[-1] == (
        "error: Redis 6.2.14 is too old: workers need Redis >= 7.0 (job leases are renewed "
        "with PEXPIRE ... GT); upgrade the server at REDIS_URL"
    )
    assert [b"INFO", b"server"] in old_redis.commands or [b"INFO", b"Server"] in old_redis.commands


async def test_redis_6_refuses_before_any_resource_is_opened(
    settings: Settings, run_burst: RunBurst
) -> None:
    async with FakeRedisServer("6.0.20") as old_redis:
        with pytest.raises(StartupRefused, match=r"Redis 6\.0\.20 is too old"):
            await run_burst(
                "imports", settings_=settings.model_copy(update={"redis_url": old_redis.url})
            )


@pytest.mark.parametrize("version", ["7.0.0", "7.2.4", "8.0.1"])
async def test_redis_7_and_later_pass(version: str) -> None:
    async with FakeRedisServer(version) as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            await check_redis(client)
        finally:
            await client.aclose()


async def test_the_real_test_redis_passes(arq_redis: ArqRedis) -> None:
    await check_redis(arq_redis)

"""Two worker processes share one send rate; secrets stay out of logs and stored errors."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.support.provider_server import RESEND_EMAILS, SENDGRID_MAIL, Answer, ProviderServer
from worker.client import JobsClient
from worker.settings import Settings

from .conftest import API_KEY, RECIPIENT, outbox_rows

RATE_PER_S = 5.0
WINDOW_S = 3.0


async def _drain(stream: asyncio.StreamReader, lines: list[str]) -> None:
    async for raw in stream:
        lines.append(raw.decode(errors="replace"))


@pytest.mark.slow
async def test_two_worker_processes_share_the_send_rate(
    settings: Settings,
    arq_redis: ArqRedis,
    redis: Redis,
    provider_server: ProviderServer,
) -> None:
    env = os.environ | {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "EMAIL_PROVIDER": "resend",
        "EMAIL_API_KEY": API_KEY,
        "EMAIL_API_BASE_URL": provider_server.base_url,
        "EMAIL_RATE_LIMIT_PER_S": str(RATE_PER_S),
        "LOG_LEVEL": "INFO",
    }
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "work",
            "default",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    logs: list[list[str]] = [[], []]
    readers = [
        # stderr=PIPE above, so never None; a comprehension has no room for the assert.
        asyncio.create_task(_drain(child.stderr, lines))  # type: ignore[arg-type]
        for child, lines in zip(children, logs, strict=True)
    ]
    try:
        deadline = time.monotonic() + 30
        while len([k async for k in redis.scan_iter(match="default:health-check:*")]) < 2:
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.1)

        # A steady trickle through the whole window, so both workers' polls keep finding jobs
        # and every send slot has emails waiting: requests, not emails, are what is limited
        # (a batch request carries all the emails waiting for its slot).
        async def trickle() -> None:
            for i in range(int((WINDOW_S + 2) / 0.02)):
                await arq_redis.enqueue_job(
                    "send_email", _queue_name="default", to=RECIPIENT, subject=f"n{i}", html="x"
                )
                await asyncio.sleep(0.02)

        feeding = asyncio.create_task(trickle())
        await asyncio.sleep(1.0)
        before = provider_server.request_count
        await asyncio.sleep(WINDOW_S)
        sent_in_window = provider_server.request_count - before
        await feeding
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*(c.wait() for c in children)), 30)
        await asyncio.gather(*readers)

    # GCRA, burst 1: one send per 200 ms across both processes (+1 for the window's edges).
    # Two per-process limiters would send about twice that.
    assert sent_in_window <= RATE_PER_S * WINDOW_S + 1
    assert sent_in_window >= RATE_PER_S * WINDOW_S * 0.6
    started = [sum("send_email(" in line for line in lines) for lines in logs]
    assert min(started) > 0, f"both processes must have sent: {started}"


async def test_secrets_stay_out_of_logs_and_stored_errors(
    caplog: pytest.LogCaptureFixture,
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
    redis: Redis,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"invalid key Bearer {API_KEY}"  # a provider echoing our header back
    provider_server.script(
        RESEND_EMAILS,
        Answer(status=500, body={"name": "internal", "message": echo}),
        # A refusal of this message (a 401 halts sending instead: test_provider_faults.py).
        Answer(status=422, body={"name": "validation_error", "message": echo}),
    )
    provider_server.script(SENDGRID_MAIL, Answer(hang=True))
    await jobs_client.send_email(RECIPIENT, "s", "<p>h</p>", idempotency_key="secret-1")
    await run_burst("default", settings_=job_settings("resend"))
    await jobs_client.send_email(RECIPIENT, "s", "<p>h</p>", idempotency_key="secret-2")
    await run_burst("default", settings_=job_settings("sendgrid"))

    rows = await outbox_rows(sessions)
    assert sorted(row.status for row in rows) == ["failed", "review"]
    errors = " ".join(row.last_error or "" for row in rows)
    assert "validation_error" in errors  # the provider's message is kept...
    assert API_KEY not in errors  # ...without the key
    assert "validation_error" in caplog.text
    assert API_KEY not in caplog.text
    stored = [await redis.get(key) async for key in redis.scan_iter(match="arq:result:*")]
    assert stored
    assert all(API_KEY.encode() not in (value or b"") for value in stored)

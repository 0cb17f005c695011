"""Without OpenTelemetry nothing changes and nothing of it is imported (a fresh interpreter
whose import system refuses `opentelemetry`, so it does not matter that the dev extra has it)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


async def test_a_job_is_enqueued_and_runs_with_opentelemetry_refused(settings: Settings) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "EMAIL_PROVIDER": "console",
        "IMPORT_DIR": str(settings.import_dir),
        "EXPORT_DIR": str(settings.export_dir),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.tracing.without_otel",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["otel_modules"] == []
    assert (seen["completed"], seen["result"]) == (1, "no-otel")
    # arq's envelope exactly: no trace field, nothing added to the job's keywords.
    assert seen["payload_keys"] == ["a", "et", "f", "k", "t"]
    assert seen["kwargs"] == {"key": "no-otel"}
    assert "trace_id" not in seen["log_line"] and seen["log_line"]["msg"] == "a line"

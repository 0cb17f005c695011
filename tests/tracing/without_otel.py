"""Run by test_without_otel.py in a fresh interpreter, with `opentelemetry` refused by an import
hook: enqueue a job through the route table, run it in a burst worker, write a JSON log line.
Prints what the test checks, as one JSON line."""

from __future__ import annotations

import asyncio
import importlib.abc
import io
import json
import logging
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class RefuseOpenTelemetry(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname.partition(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {fullname!r} (refused by the test)")
        return None


sys.meta_path.insert(0, RefuseOpenTelemetry())


async def main() -> dict[str, object]:
    from arq.connections import create_pool
    from arq.constants import job_key_prefix
    from arq.worker import Worker

    from tests.tracing.fixture_jobs import ECHO, TRACE_JOBS
    from worker.logs import JsonFormatter
    from worker.main import worker_settings
    from worker.routes import enqueue
    from worker.serialization import deserialize, serialize
    from worker.settings import Settings

    settings = Settings()  # from the environment the test gives
    pool = await create_pool(
        settings.redis_settings(), job_serializer=serialize, job_deserializer=deserialize
    )
    try:
        job = await enqueue(pool, ECHO, None, key="no-otel")
        assert job is not None
        payload = json.loads(await pool.get(job_key_prefix + job.job_id))
        kwargs = worker_settings("default", settings, burst=True, jobs=TRACE_JOBS, crons=[])
        kwargs.update(poll_delay=0, handle_signals=False)
        worker = Worker(**kwargs)
        await worker.async_run()
        await worker.close()
        result = await job.result(timeout=1)
    finally:
        await pool.aclose()
    line = io.StringIO()
    handler = logging.StreamHandler(line)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("without-otel").addHandler(handler)
    logging.getLogger("without-otel").warning("a line")
    return {
        "payload_keys": sorted(payload),
        "kwargs": payload["k"],
        "completed": worker.jobs_complete,
        "result": result,
        "log_line": json.loads(line.getvalue()),
        "otel_modules": sorted(name for name in sys.modules if name.startswith("opentelemetry")),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))

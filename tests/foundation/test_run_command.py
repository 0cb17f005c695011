"""`python -m worker run`: one worker process per queue, each logging the queue it serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worker.routes import QUEUES
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_run_starts_a_worker_per_queue_that_logs_its_queue(settings: Settings) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "IMPORT_DIR": str(settings.import_dir),
        "EXPORT_DIR": str(settings.export_dir),
        "EMAIL_PROVIDER": "console",
    }
    env.pop("C360_JOB_MODULES", None)  # the real job modules of every queue
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--burst"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for queue in QUEUES:
        assert f"worker ready: queue={queue} " in done.stderr, done.stderr[-3000:]
        assert f"worker stopped: queue={queue}" in done.stderr
    assert "Traceback" not in done.stderr

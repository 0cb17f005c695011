"""`status [--json]`: what Flower showed, from Redis and PostgreSQL, in well under a second.

The numbers come from worker/observe.py, which the web console's overview reads too.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from worker.observe import collect
from worker.settings import Settings


def register(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status", help="queues, workers, job counts, recent failures, running imports/exports"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_status)


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def render(status: dict[str, Any], console: Console) -> None:
    queues = Table(title=f"Queues at {status['generated_at']}")
    # no_wrap: counts and queue names must never be cut to "impor…" in a narrow terminal.
    queues.add_column("queue", no_wrap=True)
    for column in ("queued", "deferred", "running", "workers"):
        queues.add_column(column, justify="right", no_wrap=True)
    for column in ("completed", "failed", "retried", "died"):
        queues.add_column(column, justify="right", no_wrap=True)
    for name, queue in status["queues"].items():
        counts = queue["counts"]
        queues.add_row(
            name,
            *(str(queue[k]) for k in ("queued", "deferred", "running")),
            str(len(queue["workers"])),
            *(str(counts[k]) for k in ("completed", "failed", "retried", "died")),
        )
    console.print(queues)
    workers = Table(title="Workers")
    for column in ("queue", "worker", "last heartbeat", "arq's report"):
        workers.add_column(column)
    for name, queue in status["queues"].items():
        for worker in queue["workers"]:
            age = worker["last_heartbeat_s_ago"]
            seen = "-" if age is None else f"{age:.0f} s ago"
            workers.add_row(name, worker["worker"], seen, worker["info"])
    console.print(workers)
    if status["imports"] or status["exports"]:
        progress = Table(title="Running imports and exports")
        for column in ("kind", "id", "progress", "started"):
            progress.add_column(column)
        for row in status["imports"]:
            done = f"{row['processed_rows']}/{row['total_rows'] or '?'} rows ({row['percent']}%)"
            progress.add_row("import", row["id"], done, row["started_at"] or "-")
        for row in status["exports"]:
            done = f"{row['row_count']} rows"
            progress.add_row(f"export {row['kind']}", row["id"], done, row["started_at"] or "-")
        console.print(progress)
    failures = Table(title="Recent failures")
    for column in ("when", "queue", "job", "error"):
        failures.add_column(column)
    for failure in status["recent_failures"]:
        failures.add_row(
            _iso(failure["at_s"] * 1000),
            failure["queue"],
            f"{failure['job']} ({failure['job_id']}, try {failure['try']})",
            failure["error"],
        )
    console.print(failures)


async def run_status(args: argparse.Namespace, settings: Settings) -> int:
    status = await collect(settings)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        # Piped or over `kubectl exec` there is no terminal width: rich would assume 80 columns.
        render(status, Console(width=None if sys.stdout.isatty() else 160))
    return 0

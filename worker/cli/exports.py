"""`export contacts|companies --user ID|EMAIL [--follow]`: start an export from the shell.

Without `--follow` it prints the export id and returns at once. With it, a live line on stderr
(rich) shows the status and rows written so far, then stdout gets the outcome: the row count
and where the file is (a path or an s3:// URI), or the error, with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from worker.cli.users import resolve_user
from worker.client import ExportStatus, JobsClient
from worker.settings import Settings

POLL_INTERVAL_S = 0.5
FINISHED = ("completed", "failed")


def register(subparsers: Any) -> None:
    export = subparsers.add_parser(
        "export", help="export a user's contacts or companies to CSV (local disk or S3)"
    )
    export.add_argument("kind", choices=("contacts", "companies"))
    export.add_argument("--user", required=True, metavar="ID|EMAIL", help="the owner's id or email")
    export.add_argument(
        "--follow", action="store_true", help="show progress until done, then the location"
    )
    export.set_defaults(handler=run_export)


async def run_export(args: argparse.Namespace, settings: Settings) -> int:
    async with JobsClient.from_settings(settings) as jobs:
        user_id = await resolve_user(jobs.sessions, args.user)
        if args.kind == "contacts":
            status = await jobs.export_contacts(user_id)
        else:
            status = await jobs.export_companies(user_id)
        if not args.follow:
            print(f"export {status.id} queued: {args.kind} of user {user_id}")
            return 0
        final = await follow(jobs, status)
    if final.status == "failed":
        print(f"export {final.id} failed: {final.error}")
        return 1
    print(f"export {final.id} completed: {final.row_count} rows")
    print(final.file_path)
    return 0


async def follow(jobs: JobsClient, status: ExportStatus) -> ExportStatus:
    """Poll the export until it is completed or failed, showing progress on stderr."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[rows]:,} rows"),
        TimeElapsedColumn(),
    )
    # transient: the live line disappears when done, leaving only the outcome on stdout.
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(_describe(status), rows=status.row_count, total=None)
        while status.status not in FINISHED:
            await asyncio.sleep(POLL_INTERVAL_S)
            status = await jobs.export_status(status.id)
            progress.update(task, description=_describe(status), rows=status.row_count)
    return status


def _describe(status: ExportStatus) -> str:
    return f"{status.kind} export {status.id}: {status.status}"

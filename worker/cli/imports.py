"""`import FILE --user ID|EMAIL [--follow]`: enqueue a contact import, optionally watch it.

The worker reads only a user's own directory, `IMPORT_DIR/<user_id>/`. A FILE there is used as
it is; a FILE outside IMPORT_DIR (the operator's own) is copied into that directory first (in a
thread: a large copy must not stall the loop). A FILE in IMPORT_DIR but outside that user's
directory is refused: it is another user's upload (or an unowned one), and copying it would
hand it to this user. `s3://` sources are passed as given (the client checks the prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.cli.users import resolve_user
from worker.client import ImportStatus, JobsClient
from worker.import_source import user_import_dir
from worker.settings import Settings

POLL_S = 0.5
SHOWN_ERRORS = 10
DONE = frozenset({"completed", "failed", "cancelled"})


def register(subparsers: Any) -> None:
    command = subparsers.add_parser("import", help="import contacts from a CSV file")
    command.add_argument(
        "file",
        help="a CSV file (copied into IMPORT_DIR/<user_id>/) or s3://bucket/uploads/<user_id>/key",
    )
    command.add_argument("--user", required=True, help="the owner's user id or email")
    command.add_argument("--follow", action="store_true", help="show progress until done")
    command.set_defaults(handler=run_import_command)


async def run_import_command(args: argparse.Namespace, settings: Settings) -> int:
    async with JobsClient.from_settings(settings) as jobs:
        user_id = await resolve_user(jobs.sessions, args.user)
        source = await _place_file(settings, user_id, args.file)
        status = await jobs.import_contacts(user_id, source)
        console = Console(soft_wrap=True, highlight=False)  # ids and paths stay on one line
        console.print(f"import {status.id} queued ({source})")
        if not args.follow:
            return 0
        final = await _follow(jobs, status, console)
        return await _report(jobs, final, console)


async def _place_file(settings: Settings, user_id: uuid.UUID, file: str) -> str:
    """The path to enqueue: `file` itself when in the user's directory (or S3), else a copy
    there of a file from outside IMPORT_DIR."""
    if "://" in file:
        return file
    path = Path(file)
    if not await asyncio.to_thread(path.is_file):
        raise LookupError(f"{file}: no such file")
    home = await asyncio.to_thread(user_import_dir, settings, user_id)
    resolved = await asyncio.to_thread(path.resolve)
    if resolved.is_relative_to(home):
        return str(resolved)
    if resolved.is_relative_to(home.parent):
        raise ValueError(
            f"{file} is in IMPORT_DIR but not in this user's directory {home}; "
            "import it for the user whose directory holds it"
        )
    target = home / f"{uuid.uuid4().hex[:12]}-{path.name}"
    await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(shutil.copyfile, resolved, target)
    return str(target)


async def _follow(jobs: JobsClient, status: ImportStatus, console: Console) -> ImportStatus:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(status.status, total=None, rate="")
        started_s = time.monotonic()
        first_rows = status.processed_rows
        while status.status not in DONE:
            await asyncio.sleep(POLL_S)
            status = await jobs.import_status(status.id)
            elapsed_s = time.monotonic() - started_s
            rate = (status.processed_rows - first_rows) / elapsed_s if elapsed_s else 0.0
            bar.update(
                task,
                description=status.status,
                total=status.total_rows,
                completed=status.processed_rows,
                rate=f"{rate:,.0f} rows/s",
            )
    return status


async def _report(jobs: JobsClient, status: ImportStatus, console: Console) -> int:
    console.print(
        f"{status.status}: {status.processed_rows} of {status.total_rows or 0} rows, "
        f"{status.created_count} created, {status.updated_count} updated, "
        f"{status.error_count} with errors"
    )
    if status.message:
        console.print(status.message, markup=False)
    errors = await jobs.import_errors(status.id, limit=SHOWN_ERRORS)
    for error in errors:
        console.print(f"  row {error.row_number}: {error.message}", markup=False)
    if status.error_count > len(errors):
        console.print(f"  ... and {status.error_count - len(errors)} more")
    return 0 if status.status == "completed" else 1

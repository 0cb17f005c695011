"""`suppress add|remove|list`: the operator's hand on the suppression list (CONTRACT §13).

`add EMAIL [--reason manual]` (default `manual`: all email), `remove EMAIL`, and
`list [--reason R] [--limit N]` (newest first, tab-separated: email, reason, added, source).
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

from db.models import SUPPRESSION_REASONS
from db.session import create_engine, make_sessionmaker
from jobs.email.suppression import list_suppressions, suppress, unsuppress
from worker.settings import Settings


def register(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "suppress", help="add, remove or list addresses that get no (campaign) email"
    )
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="stop email to EMAIL (unsubscribe: campaign email only)")
    add.add_argument("email")
    add.add_argument("--reason", choices=SUPPRESSION_REASONS, default="manual")
    add.set_defaults(handler=run_add)
    remove = actions.add_parser("remove", help="let EMAIL get email again")
    remove.add_argument("email")
    remove.set_defaults(handler=run_remove)
    listing = actions.add_parser("list", help="the newest entries first")
    listing.add_argument("--reason", choices=SUPPRESSION_REASONS)
    listing.add_argument("--limit", type=_positive, default=100)
    listing.set_defaults(handler=run_list)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return int(value)


def _operator() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "cli"


async def run_add(args: argparse.Namespace, settings: Settings) -> int:
    engine = create_engine(settings.database, pool_size=1, pooler=settings.database_pooler)
    try:
        async with make_sessionmaker(engine).begin() as session:
            await suppress(session, args.email, args.reason, _operator())
    finally:
        await engine.dispose()
    print(f"suppressed {args.email.strip().lower()} ({args.reason})")
    return 0


async def run_remove(args: argparse.Namespace, settings: Settings) -> int:
    engine = create_engine(settings.database, pool_size=1, pooler=settings.database_pooler)
    try:
        async with make_sessionmaker(engine).begin() as session:
            removed = await unsuppress(session, args.email)
    finally:
        await engine.dispose()
    if not removed:
        raise LookupError(f"{args.email.strip().lower()} is not on the suppression list")
    print(f"removed {args.email.strip().lower()} from the suppression list")
    return 0


async def run_list(args: argparse.Namespace, settings: Settings) -> int:
    engine = create_engine(settings.database, pool_size=1, pooler=settings.database_pooler)
    try:
        async with make_sessionmaker(engine)() as session:
            rows = await list_suppressions(session, reason=args.reason, limit=args.limit)
    finally:
        await engine.dispose()
    for row in rows:
        print(f"{row.email}\t{row.reason}\t{row.created_at.isoformat()}\t{row.source}")
    return 0

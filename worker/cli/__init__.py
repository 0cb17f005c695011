"""`python -m worker COMMAND`: the operator's entry point (CONTRACT §11).

Each command lives in its own module with a `register(subparsers)` that sets `handler`, an
async function `(args, settings) -> exit code`. User mistakes print one line and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from worker.cli import console, exports, imports, maintenance, public, run, status, suppress
from worker.logs import configure_logging
from worker.preflight import StartupRefused
from worker.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]
COMMAND_MODULES = (run, maintenance, status, imports, exports, console, public, suppress)


class UserError(Exception):
    """A mistake the operator can fix: printed as one line, no traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def load_settings() -> Settings:
    """Settings from the environment; a bad value raises `UserError` naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        # include_input=False: the rejected value may be a secret (a URL with a password).
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper() or 'settings'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise UserError(f"invalid configuration: {problems}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("LOG_FORMAT") == "json")
    handler: Handler = args.handler
    try:
        settings = load_settings()
        with asyncio.Runner() as runner:
            return runner.run(handler(args, settings))
    except (UserError, StartupRefused, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        logging.getLogger(__name__).debug("connection failed", exc_info=True)
        print(f"error: {exc} (is the service running? see README 'Quickstart')", file=sys.stderr)
        return 1

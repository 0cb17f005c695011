"""`console [--host 127.0.0.1] [--port 8000]`: serve the operator console with uvicorn."""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from worker.settings import Settings
from worker.web.auth import console_password


def register(subparsers: Any) -> None:
    console = subparsers.add_parser("console", help="serve the web console (CONTRACT §12)")
    # Loopback by default: the console can cancel and retry jobs; expose it on purpose.
    console.add_argument("--host", default="127.0.0.1")
    console.add_argument("--port", type=int, default=8000)
    console.set_defaults(handler=run_console)


async def run_console(args: argparse.Namespace, settings: Settings) -> int:
    # Checked before uvicorn starts: one line (ConsoleNotConfigured is a ValueError), no trace.
    console_password(settings)
    from worker.web.console import create_app  # Starlette loads only for this command

    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,  # keep our logging (worker.logs), JSON lines included
        proxy_headers=False,
        server_header=False,
    )
    await uvicorn.Server(config).serve()
    return 0

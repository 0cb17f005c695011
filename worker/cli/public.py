"""`public [--host 127.0.0.1] [--port 8001]`: serve the public app (worker/web/public.py) alone."""

from __future__ import annotations

import argparse
from typing import Any

from worker.settings import Settings
from worker.tokens import MissingSecretKey


def register(subparsers: Any) -> None:
    public = subparsers.add_parser(
        "public", help="serve the unsubscribe and confirmation pages (CONTRACT §13)"
    )
    # Loopback by default: put it behind the proxy that serves APP_URL.
    public.add_argument("--host", default="127.0.0.1")
    public.add_argument("--port", type=int, default=8001)
    public.set_defaults(handler=run_public)


async def run_public(args: argparse.Namespace, settings: Settings) -> int:
    if settings.secret_key is None:  # one line before uvicorn starts (a ValueError: exit 2)
        raise MissingSecretKey("python -m worker public needs SECRET_KEY (it checks our links)")
    from worker.web.public import create_app  # Starlette loads only for this command
    from worker.web.serving import serve

    # Every path carries a token that unsubscribes someone: no access log line may hold it.
    await serve(create_app(settings), args.host, args.port, access_log=False)
    return 0

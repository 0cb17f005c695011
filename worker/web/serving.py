"""Serve one of our ASGI apps with uvicorn, the way every `python -m worker` web command does."""

from __future__ import annotations

import uvicorn
from starlette.types import ASGIApp


async def serve(app: ASGIApp, host: str, port: int, *, access_log: bool = True) -> None:
    """Until stopped (SIGINT/SIGTERM), with our logging and no `Server:` header."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep our logging (worker.logs), JSON lines included
        access_log=access_log,
        proxy_headers=False,
        server_header=False,
    )
    await uvicorn.Server(config).serve()

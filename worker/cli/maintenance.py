"""`migrate` and `health`: the one-shot commands deployments run (compose, Kubernetes probes)."""

from __future__ import annotations

import argparse
import socket
from typing import Any

from worker.redis_connect import redis_client
from worker.routes import QUEUES
from worker.settings import Settings


def register(subparsers: Any) -> None:
    migrate = subparsers.add_parser(
        "migrate", help="create the database if missing, upgrade schema"
    )
    migrate.set_defaults(handler=run_migrate)
    health = subparsers.add_parser(
        "health", help="exit 0 when a worker of QUEUE on this host has reported in (healthchecks)"
    )
    health.add_argument("--queue", choices=sorted(QUEUES), required=True)
    health.set_defaults(handler=run_health)


async def run_migrate(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: Alembic costs every worker process ~6.5 MB of RSS it never uses.
    from db.migrate import upgrade

    await upgrade(settings.database, pooler=settings.database_pooler)
    print(f"database {settings.database.database} is at the latest schema")
    return 0


async def run_health(args: argparse.Namespace, settings: Settings) -> int:
    client = redis_client(settings)
    try:
        pattern = f"{args.queue}:health-check:{socket.gethostname()}:*"
        async for _key in client.scan_iter(match=pattern, count=1000):
            return 0
    finally:
        await client.aclose()
    print(f"no live {args.queue} worker on this host")
    return 1

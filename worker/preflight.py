"""Start-up checks: a worker that would run wrongly refuses to start, with one clear line.

Every worker start goes through them: `worker_settings` checks the configuration (before any
connection), `lifecycle.startup` checks the Redis server. The entry points print
`StartupRefused` as one line (`python -m worker`, arq's CLI through `worker.main`).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from worker.routes import SEND_EMAIL, QueueName
from worker.settings import Settings

# Lease renewal (worker/lease.py) uses `PEXPIRE ... GT`, added in Redis 7.0: on 6.x every
# renewal fails and each job longer than one lease runs again on a second worker.
MIN_REDIS_VERSION = (7, 0)
# The queue whose jobs send email (worker/routes.py).
EMAIL_QUEUE: QueueName = SEND_EMAIL.queue


class StartupRefused(Exception):
    """This worker must not start; the message says what to change."""


def check_settings(queue: str, settings: Settings) -> None:
    """Refuse a configuration that would run the queue wrongly."""
    if queue == EMAIL_QUEUE and settings.email_provider is None:
        # No default on purpose: a deploy that misses the variable would otherwise settle
        # every email `sent` while sending nothing (audit M7).
        raise StartupRefused(
            f"EMAIL_PROVIDER is not set, and the {queue} queue sends email: set it to "
            "resend or sendgrid (with EMAIL_API_KEY), or to console for development "
            "(logs each email, sends nothing)"
        )


def redis_version(info: dict[str, Any]) -> tuple[int, ...]:
    """`redis_version` of an `INFO server` answer as numbers; () when absent or unreadable."""
    raw = str(info.get("redis_version", ""))
    try:
        return tuple(int(part) for part in raw.split("."))
    except ValueError:
        return ()


async def check_redis(redis: Redis) -> None:
    """Refuse a Redis server older than `MIN_REDIS_VERSION` (or one that does not say)."""
    info = await redis.info("server")
    version = redis_version(info)
    if version[:2] < MIN_REDIS_VERSION:
        shown = info.get("redis_version") or "unknown"
        required = ".".join(map(str, MIN_REDIS_VERSION))
        raise StartupRefused(
            f"Redis {shown} is too old: workers need Redis >= {required} "
            "(job leases are renewed with PEXPIRE ... GT); upgrade the server at REDIS_URL"
        )

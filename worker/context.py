"""The typed ctx every job receives: what `lifecycle.startup` opened, plus arq's per-job keys."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import datetime
from typing import TYPE_CHECKING, NotRequired, TypedDict

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from worker.email_providers import EmailProvider
from worker.marketing import MarketingProvider
from worker.ratelimit import RateLimiter
from worker.settings import Settings
from worker.storage import Storage

if TYPE_CHECKING:
    import aioboto3
    from arq.connections import ArqRedis


class Ctx(TypedDict):
    # Given when the worker is built (worker.main.worker_settings).
    settings: Settings
    queue_name: str
    # Opened by lifecycle.startup, closed in reverse order by lifecycle.shutdown.
    redis: ArqRedis
    exit_stack: NotRequired[AsyncExitStack]
    engine: NotRequired[AsyncEngine]
    sessions: NotRequired[async_sessionmaker[AsyncSession]]
    http: NotRequired[httpx.AsyncClient]
    email_provider: NotRequired[EmailProvider]
    marketing_provider: NotRequired[MarketingProvider]
    email_rate_limiter: NotRequired[RateLimiter]
    s3_session: NotRequired[aioboto3.Session]
    storage: NotRequired[Storage]
    # Set by arq for each job run.
    job_id: NotRequired[str]
    job_try: NotRequired[int]
    enqueue_time: NotRequired[datetime]
    score: NotRequired[int]
    # Set by worker.job for each job run: event-loop time after which a long job should
    # checkpoint and continue in a fresh try (the soft time limit).
    soft_deadline: NotRequired[float]

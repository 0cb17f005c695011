"""One way for tests to build a job's ctx: the real `lifecycle.startup`, then the test's swaps.

    ctx = await open_ctx("exports", storage=LocalStorage(tmp_path))      # the `open_ctx` fixture
    await run_burst("exports", on_startup=startup_with(storage=storage))  # a worker's startup

A swapped-in resource replaces what startup built for the ctx's users; what startup built
stays in its exit stack and is closed by the real `shutdown`. The swapped-in one is the test's.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis

from worker.context import Ctx, Resources, as_ctx
from worker.lifecycle import shutdown, startup
from worker.routes import QueueName
from worker.settings import Settings


def swap_resources(arq_ctx: dict[str, Any], resources: dict[str, Any]) -> None:
    """Put the test's `resources` in place of those `startup` opened; only known names."""
    if unknown := sorted(set(resources) - Resources.__required_keys__):
        known = ", ".join(sorted(Resources.__required_keys__))
        raise TypeError(f"not a resource lifecycle.startup opens: {', '.join(unknown)} ({known})")
    arq_ctx.update(resources)


def startup_with(**resources: Any) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """A worker's `on_startup`: the real startup, then the test's `resources` swapped in."""
    swap_resources({}, resources)  # a misspelt name fails the test here, not in the worker

    async def test_startup(arq_ctx: dict[str, Any]) -> None:
        await startup(arq_ctx)
        swap_resources(arq_ctx, resources)

    return test_startup


class CtxOpener:
    """`await opener("imports", settings=..., storage=...)`: a ctx to call a job directly.

    It holds what arq gives a job's first try (job id, try, enqueue time, score). `close`
    shuts every opened ctx down through the real `shutdown`.
    """

    def __init__(self, settings: Settings, redis: ArqRedis) -> None:
        self.settings = settings
        self.redis = redis
        self._opened: list[dict[str, Any]] = []

    async def __call__(
        self, queue: QueueName, *, settings: Settings | None = None, **resources: Any
    ) -> Ctx:
        arq_ctx: dict[str, Any] = {
            "settings": settings or self.settings,
            "queue_name": queue,
            "redis": self.redis,
        }
        await startup(arq_ctx)
        self._opened.append(arq_ctx)
        swap_resources(arq_ctx, resources)
        enqueued = datetime.now(UTC)
        arq_ctx.update(
            job_id=f"test-{uuid.uuid4().hex[:8]}",
            job_try=1,
            enqueue_time=enqueued,
            score=int(enqueued.timestamp() * 1000),
        )
        return as_ctx(arq_ctx)

    async def close(self) -> None:
        while self._opened:
            await shutdown(self._opened.pop())

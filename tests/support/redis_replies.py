"""`await reply(redis.hgetall(key))`: an asyncio client's reply, typed as what it holds.

redis-py types its hash, list and set commands for its sync and asyncio clients at once
(`Awaitable[T] | T`), so mypy cannot tell that an asyncio client's call is always awaitable.
The worker casts at each call (worker/reconcile.py); tests, which read Redis far more often,
say it once here.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import TypeVar, cast

T = TypeVar("T")


async def reply(call: Awaitable[T] | T) -> T:
    """The reply of an asyncio redis client's command; anything else is a test's mistake."""
    if not inspect.isawaitable(call):
        raise TypeError(f"not an asyncio redis call: {call!r}")
    return await cast(Awaitable[T], call)

"""Send many outbox messages from inside one job, a bounded number at a time.

A cron that sends a page of 1,000 emails starts them all as tasks but lets at most
`concurrency` talk to the provider at once: the provider's rate limit (a shared Redis limiter)
is the bound, not the worker. Each message keeps the outbox's guarantees on its own; one that
fails transiently stays `pending` for the next run, and a bug or a database outage in one is
raised once the page has finished, so no claimed message is abandoned mid-send.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from jobs.email.outbox import Outcome
from worker.errors import TransientError

T = TypeVar("T")
DEFAULT_CONCURRENCY = 50


def count(outcome: Outcome, counts: Counter[str]) -> None:
    """Tally an outcome under sent | duplicate | failed | review."""
    counts["duplicate" if not outcome.fresh else outcome.status] += 1


async def send_page(
    items: Sequence[T],
    send_one: Callable[[T], Awaitable[Outcome]],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Counter[str]:
    """Run `send_one` over `items`, `concurrency` at a time; counts, with `retry` for the rest."""
    semaphore = asyncio.Semaphore(concurrency)
    counts: Counter[str] = Counter()

    async def one(item: T) -> None:
        async with semaphore:
            try:
                count(await send_one(item), counts)
            except TransientError:
                counts["retry"] += 1  # recorded on its row; the next run picks it up

    results = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return counts

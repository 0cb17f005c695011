"""Send many outbox messages from inside one job, a bounded number at a time.

A cron that sends a page of 1,000 emails starts them all as tasks but lets at most
`concurrency` talk to the provider at once: the provider's rate limit (a shared Redis limiter)
is the bound, not the worker. Each message keeps the outbox's guarantees on its own; one that
fails transiently stays `pending` for the next run, and a bug or a database outage in one is
raised once the page has finished, so no claimed message is abandoned mid-send. Once the
provider refuses the account (`ProviderFault`), no further message of the page is started:
they all stay due for the next run, and `halted(counts)` tells the caller to stop too.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TypedDict, TypeVar, cast

from jobs.email.outbox import Outcome
from worker.errors import ProviderFault, TransientError

T = TypeVar("T")
DEFAULT_CONCURRENCY = 50


class SendCounts(TypedDict, total=False):
    """A page's (or a tick's) tally in a job's result; a key is there once it counts one."""

    sent: int
    duplicate: int
    failed: int
    review: int
    pending: int
    retry: int  # failed transiently: recorded on its row, picked up by the next run
    not_tried: int  # not started after the provider refused the account
    provider_refused: int
    stopped_early: int  # 1: the run left the rest due for the next one
    expired_unconfirmed: int  # waitlist sign-ups deleted, never confirmed (campaign tick)
    not_configured: int  # 1: APP_URL or SECRET_KEY missing, nothing sent (campaign tick)


def as_result(counts: Counter[str]) -> SendCounts:
    """`counts` as a job result: its keys are only ever those of `SendCounts` (this module
    and the crons' `stopped_early` write them), so the cast names what they hold."""
    return cast(SendCounts, dict(counts))


def halted(counts: Counter[str]) -> bool:
    """Whether `send_page` stopped because the provider refused the account."""
    return counts["provider_refused"] > 0


def count(outcome: Outcome, counts: Counter[str]) -> None:
    """Tally an outcome under sent | duplicate | failed | review."""
    counts["duplicate" if not outcome.fresh else outcome.status] += 1


async def send_page(
    items: Sequence[T],
    send_one: Callable[[T], Awaitable[Outcome]],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Counter[str]:
    """Run `send_one` over `items`, `concurrency` at a time; counts, with `retry` for the rest.

    After a `ProviderFault` the items not yet started are counted `not_tried` and left alone.
    """
    semaphore = asyncio.Semaphore(concurrency)
    counts: Counter[str] = Counter()

    async def one(item: T) -> None:
        async with semaphore:
            if halted(counts):
                counts["not_tried"] += 1
                return
            try:
                count(await send_one(item), counts)
            except ProviderFault:
                counts["provider_refused"] += 1  # the row is pending, its attempt not counted
            except TransientError:
                counts["retry"] += 1  # recorded on its row; the next run picks it up

    results = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return counts

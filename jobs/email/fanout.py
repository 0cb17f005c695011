"""Send many outbox messages from inside one job, a bounded number at a time.

A cron that sends pages of 1,000 emails starts each page's messages as tasks but lets at most
`concurrency` talk to the provider at once: the provider's rate limit (a shared Redis limiter)
is the bound, not the worker. The next page is read as soon as the last message of the current
one has started, so a page's tail overlaps the next page's head and the batcher always has
drafts to group (waiting for a page to finish left the rate limit idle at every boundary). Each
message keeps the outbox's guarantees on its own; one that fails transiently stays `pending`
for the next run, and a bug or a database outage in one stops the reading of pages and is
raised once every started message has finished, so no claimed message is abandoned mid-send.
Once the provider refuses the account (`ProviderFault`), no further message is started: they
all stay due for the next run, and `halted(counts)` tells the caller to stop too.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Generic, TypedDict, TypeVar, cast

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
    """Whether the sends stopped because the provider refused the account."""
    return counts["provider_refused"] > 0


def count(outcome: Outcome, counts: Counter[str]) -> None:
    """Tally an outcome under sent | duplicate | failed | review."""
    counts["duplicate" if not outcome.fresh else outcome.status] += 1


class Fanout(Generic[T]):
    """`send_one` over successive pages under one bound of `concurrency` sends in flight.

    Used as `async with Fanout(send_one) as fanout:` around the caller's page loop. Leaving the
    block waits for every started send (also when the block raised, say a page read failing
    while the previous page's tail is in flight), then raises the first error a send raised. A
    cancelled caller (a job timeout, a shutdown) cancels the sends still running.
    """

    def __init__(
        self, send_one: Callable[[T], Awaitable[Outcome]], *, concurrency: int = DEFAULT_CONCURRENCY
    ) -> None:
        self._send_one = send_one
        self._slots = asyncio.Semaphore(concurrency)
        self._sends: list[asyncio.Task[None]] = []
        self._errors: list[Exception] = []
        self.counts: Counter[str] = Counter()

    @property
    def stopped(self) -> bool:
        """Whether the caller should read no further page: the account was refused, or a
        send raised what is not an outcome of its own (raised when the block ends)."""
        return halted(self.counts) or bool(self._errors)

    async def start(self, items: Sequence[T]) -> None:
        """Start a send for each of `items`; return once the last of them holds a slot."""
        waiting = len(items)
        all_started = asyncio.Event()

        async def one(item: T) -> None:
            nonlocal waiting
            async with self._slots:  # FIFO: a page's items get slots before the next page's
                waiting -= 1
                if waiting == 0:
                    all_started.set()
                if halted(self.counts):
                    self.counts["not_tried"] += 1
                    return
                try:
                    count(await self._send_one(item), self.counts)
                except ProviderFault:
                    self.counts["provider_refused"] += 1  # the row is pending, attempt not counted
                except TransientError:
                    self.counts["retry"] += 1  # recorded on its row; the next run picks it up
                except Exception as exc:
                    self._errors.append(exc)  # raised once every started send has finished

        # Finished sends are dropped (their outcomes are counted): a 50,000-entry tick keeps
        # one page of tasks and the sends still in flight, not every one it ran.
        self._sends = [send for send in self._sends if not send.done()]
        self._sends += [asyncio.create_task(one(item)) for item in items]
        if items:
            await all_started.wait()

    async def __aenter__(self) -> Fanout[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            await self._cancel()  # cancelled (or interrupted) while inside the block
            return
        try:
            if self._sends:
                await asyncio.wait(self._sends)
        except asyncio.CancelledError:
            await self._cancel()
            raise
        if exc is None and self._errors:
            raise self._errors[0]

    async def _cancel(self) -> None:
        for send in self._sends:
            send.cancel()
        if self._sends:
            await asyncio.wait(self._sends)

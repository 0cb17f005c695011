"""Fanout (jobs/email/fanout.py): pages overlap under one bound; no started send is abandoned."""

from __future__ import annotations

import asyncio

import pytest

from jobs.email.fanout import Fanout
from jobs.email.outbox import Outcome
from worker.errors import ProviderFault


class Sends:
    """A `send_one` whose sends wait until the test lets each one finish."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.fail: dict[int, Exception] = {}

    def gate(self, item: int) -> asyncio.Event:
        return self.gates.setdefault(item, asyncio.Event())

    async def __call__(self, item: int) -> Outcome:
        self.started.append(item)
        try:
            await self.gate(item).wait()
        except asyncio.CancelledError:
            self.cancelled.append(item)
            raise
        if item in self.fail:
            raise self.fail[item]
        self.finished.append(item)
        return Outcome(key=f"k{item}", status="sent")

    def release(self, *items: int) -> None:
        for item in items:
            self.gate(item).set()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_the_next_page_starts_while_the_previous_page_is_still_sending() -> None:
    sends = Sends()
    async with Fanout(sends, concurrency=3) as fanout:
        await asyncio.wait_for(fanout.start([1, 2, 3]), 1)
        # Every send of page 1 holds a slot and none has finished: the caller may read on.
        assert sends.started == [1, 2, 3] and sends.finished == []
        second = asyncio.create_task(fanout.start([4, 5]))
        await _settle()
        assert not second.done(), "page 2 waits for slots, the bound covers both pages"
        sends.release(1, 2)
        await asyncio.wait_for(second, 1)
        assert sends.started == [1, 2, 3, 4, 5]  # page 1's items got their slots first
        sends.release(3, 4, 5)
    assert sorted(sends.finished) == [1, 2, 3, 4, 5]
    assert fanout.counts == {"sent": 5}


async def test_an_error_stops_the_pages_and_is_raised_after_every_started_send_finished() -> None:
    sends = Sends()
    sends.fail[1] = RuntimeError("a bug in one send")
    with pytest.raises(RuntimeError, match="a bug in one send"):
        async with Fanout(sends, concurrency=5) as fanout:
            await fanout.start([1, 2, 3])
            sends.release(1)
            await _settle()
            assert fanout.stopped
            asyncio.get_running_loop().call_later(0.05, sends.release, 2, 3)
    assert sorted(sends.finished) == [2, 3] and sends.cancelled == []


async def test_a_failing_page_read_waits_for_the_sends_in_flight() -> None:
    sends = Sends()
    with pytest.raises(ConnectionError, match="page read"):
        async with Fanout(sends, concurrency=5) as fanout:
            await fanout.start([1, 2])
            asyncio.get_running_loop().call_later(0.05, sends.release, 1, 2)
            raise ConnectionError("page read failed")
    assert sorted(sends.finished) == [1, 2] and sends.cancelled == []


async def test_a_cancelled_caller_cancels_the_sends_still_running() -> None:
    sends = Sends()

    async def tick() -> None:
        async with Fanout(sends, concurrency=5) as fanout:
            await fanout.start([1, 2])

    task = asyncio.create_task(tick())
    await _settle()
    assert sends.started == [1, 2]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(sends.cancelled) == [1, 2] and sends.finished == []


async def test_a_refused_account_leaves_the_sends_not_yet_started_untried() -> None:
    sends = Sends()
    sends.fail[1] = ProviderFault("the API key was revoked", retry_after_s=300)
    async with Fanout(sends, concurrency=1) as fanout:
        sends.release(1, 2, 3)
        await fanout.start([1, 2, 3])
    assert fanout.stopped
    assert fanout.counts == {"provider_refused": 1, "not_tried": 2}
    assert sends.started == [1]

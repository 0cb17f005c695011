"""The Redis-shared send limit (the rig's TEST_REDIS_DB), across connections and processes.

The assertions count grants inside a window; they do not time our code. The upper bound is
what GCRA allows (one grant per interval, plus the burst); the lower bound proves the limiter
is not simply refusing everything.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from redis.asyncio import Redis

from worker.ratelimit import RateLimiter

RATE_PER_S = 20.0
WINDOW_S = 1.5


async def count_grants(limiter: RateLimiter, until_monotonic: float, workers: int = 5) -> int:
    """Acquire from `workers` concurrent tasks until the deadline; grants inside it."""
    granted = 0

    async def worker() -> None:
        nonlocal granted
        while True:
            remaining_s = until_monotonic - time.monotonic()
            if remaining_s <= 0:
                return
            try:
                await limiter.acquire(timeout_s=remaining_s)
            except TimeoutError:
                return
            if time.monotonic() <= until_monotonic:
                granted += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return granted


async def test_two_connections_share_one_rate(redis_url: str, ratelimit_prefix: str) -> None:
    redis_a, redis_b = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        a = RateLimiter(redis_a, RATE_PER_S, key_prefix=ratelimit_prefix)
        b = RateLimiter(redis_b, RATE_PER_S, key_prefix=ratelimit_prefix)
        # Connect and load the script on both first, so neither starts the window late.
        await a.acquire()
        await b.acquire()
        deadline = time.monotonic() + WINDOW_S
        granted_a, granted_b = await asyncio.gather(
            count_grants(a, deadline), count_grants(b, deadline)
        )
    finally:
        await redis_a.aclose()
        await redis_b.aclose()
    total = granted_a + granted_b
    # GCRA with burst 1: at most one grant per 50 ms interval, plus the first one at once.
    assert total <= RATE_PER_S * WINDOW_S + 1
    # The limiter must not starve senders either; loose, since a loaded CI box oversleeps.
    assert total >= RATE_PER_S * WINDOW_S * 0.3
    assert granted_a > 0
    assert granted_b > 0


async def test_burst_allows_that_many_at_once(redis: Redis, ratelimit_prefix: str) -> None:
    limiter = RateLimiter(redis, 1.0, burst=3, key_prefix=ratelimit_prefix)
    waits_s = [await limiter.try_acquire() for _ in range(4)]
    assert waits_s[:3] == [0.0, 0.0, 0.0]
    assert 0.9 < waits_s[3] <= 1.0


_CHILD = """
import asyncio, sys, time
from redis.asyncio import Redis
from worker.ratelimit import RateLimiter

async def main(url, prefix, rate, start_unix_s, window_s):
    redis = Redis.from_url(url)
    limiter = RateLimiter(redis, rate, key_prefix=prefix)
    await asyncio.sleep(max(0.0, start_unix_s - time.time()))
    deadline = time.monotonic() + window_s
    granted = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            await limiter.acquire(timeout_s=remaining)
        except TimeoutError:
            break
        if time.monotonic() <= deadline:
            granted += 1
    await redis.aclose()
    print(granted)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]),
                 float(sys.argv[5])))
"""


async def test_two_processes_share_one_rate(redis_url: str, ratelimit_prefix: str) -> None:
    # Both children start acquiring at the same wall-clock instant, after their imports.
    start_unix_s = time.time() + 1.5
    args = [redis_url, ratelimit_prefix, str(RATE_PER_S), str(start_unix_s), str(WINDOW_S)]
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, *args, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(
        asyncio.gather(*(child.communicate() for child in children)), timeout=30
    )
    assert [child.returncode for child in children] == [0, 0]
    counts = [int(stdout.decode().strip()) for stdout, _ in outputs]
    assert sum(counts) <= RATE_PER_S * WINDOW_S + 1
    assert sum(counts) >= RATE_PER_S * WINDOW_S * 0.6
    assert min(counts) > 0


async def test_pause_until_blocks_every_limiter(redis_url: str, ratelimit_prefix: str) -> None:
    redis_a, redis_b = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        a = RateLimiter(redis_a, 100.0, key_prefix=ratelimit_prefix)
        b = RateLimiter(redis_b, 100.0, key_prefix=ratelimit_prefix)
        assert await a.try_acquire() == 0.0

        await a.pause_until(time.time() + 1.5)  # e.g. a SendGrid X-RateLimit-Reset
        deadline = time.monotonic() + 0.8
        during = await asyncio.gather(count_grants(a, deadline), count_grants(b, deadline))
        assert list(during) == [0, 0]
        assert await b.paused_for_s() > 0

        # Once the reset has passed, both get slots again without anyone lifting the pause.
        await b.acquire(timeout_s=5)
        await a.acquire(timeout_s=5)
        assert await a.paused_for_s() == 0.0
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


async def test_pause_only_extends(redis: Redis, ratelimit_prefix: str) -> None:
    limiter = RateLimiter(redis, 10.0, key_prefix=ratelimit_prefix)
    await limiter.pause_for(30)
    await limiter.pause_for(1)  # a shorter wait from another worker must not shorten it
    await limiter.pause_until(time.time() - 5)  # a reset in the past changes nothing
    assert 25 < await limiter.paused_for_s() <= 30
    with pytest.raises(TimeoutError):
        await limiter.acquire(timeout_s=0.2)
    await redis.delete(f"{ratelimit_prefix}:paused_until")  # an operator lifting the pause
    assert await limiter.try_acquire() == 0.0


async def test_no_pause_means_zero(redis: Redis, ratelimit_prefix: str) -> None:
    limiter = RateLimiter(redis, 10.0, key_prefix=ratelimit_prefix)
    assert await limiter.paused_for_s() == 0.0
    assert repr(limiter) == (
        f"RateLimiter(rate_per_s=10, burst=1, key_prefix='{ratelimit_prefix}')"
    )


def test_rejects_nonsense(redis: Redis) -> None:
    with pytest.raises(ValueError, match="rate_per_s must be positive"):
        RateLimiter(redis, 0)
    with pytest.raises(ValueError, match="burst must be at least 1"):
        RateLimiter(redis, 1, burst=0)


async def test_a_halt_stops_every_limiter_at_once_and_is_started_once(
    redis_url: str, ratelimit_prefix: str
) -> None:
    """Two processes' limiters: the halt one sets is seen by the other, which does not wait."""
    from worker.errors import ProviderFault

    first = Redis.from_url(redis_url)
    second = Redis.from_url(redis_url)
    try:
        here = RateLimiter(first, RATE_PER_S, key_prefix=ratelimit_prefix)
        there = RateLimiter(second, RATE_PER_S, key_prefix=ratelimit_prefix)
        assert await here.halt(300, "resend answered 401: missing_api_key") is True
        assert await there.halt(300, "resend answered 401: missing_api_key") is False
        with pytest.raises(ProviderFault, match="missing_api_key") as info:
            await there.acquire(timeout_s=600)  # raises now instead of waiting 300 s
        assert 0 < info.value.retry_after_s <= 300
        await there.resume()
        assert await here.halted() is None
        assert await here.acquire(timeout_s=5) >= 0
    finally:
        await first.aclose()
        await second.aclose()

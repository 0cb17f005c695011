"""A send-rate limit shared by every worker process through Redis (GCRA, one Lua script).

GCRA keeps one number per limit, the "theoretical arrival time" (TAT) of the next send: a send
is allowed when `now >= TAT - (burst - 1) * interval`, and moves TAT one interval on. The check
and the update run in one script, so any number of processes see one limit; the clock is Redis's
`TIME`, so worker hosts with skewed clocks still agree. A denied caller is told how long to
wait and sleeps that long (no polling loop against Redis).

A provider's 429 stores a pause deadline next to the TAT: until it passes, every `acquire`
everywhere waits, which is how "one worker was told to slow down" slows all of them.

A provider that refuses the account (401/403: a bad key, an unverified domain) halts the
limiter: the same pause, plus the reason next to it. While a halt holds, `acquire` raises
`ProviderFault` at once instead of waiting, so a cron stops its tick and a send job retries
later, and no message is claimed only to be refused the same way.

    limiter = RateLimiter(redis, rate_per_s=settings.email_rate_per_s)
    await limiter.acquire()                          # before every send
    await limiter.pause_for(exc.retry_after_s)       # after RateLimited
    await limiter.halt(exc.retry_after_s, str(exc))  # after ProviderFault
    await limiter.resume()                           # an operator fixed the key: go on now

Each 429 pause that starts (none was holding) and each halt adds one to `<prefix>:pauses`
(fields `rate_limited`, `halted`), which `/metrics` exposes as `c360_rate_limit_pauses_total`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import Any, cast

from redis.asyncio import Redis

from worker.errors import ProviderFault

DEFAULT_KEY_PREFIX = "c360:ratelimit:email"

# KEYS[1] = TAT (microseconds, Redis clock), KEYS[2] = pause deadline (microseconds, Unix).
# ARGV[1] = interval_us, ARGV[2] = burst, ARGV[3] = '1' to only look (nothing is taken).
# Returns 0 when granted (or, looking, when a slot is free now), else microseconds to wait.
# Redis >= 5 replicates script effects, so reading TIME before writing is allowed.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then
  return paused - now
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local allow_at = tat - (burst - 1) * interval
if now < allow_at then
  return allow_at - now
end
if ARGV[3] == '1' then return 0 end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"""

# KEYS[1] = pause deadline, KEYS[2] = pause counters. ARGV[1] = deadline in Unix microseconds,
# or ARGV[2] = seconds from Redis's now (whichever is non-negative); ARGV[3] = the counter's
# field, '' for none. Only ever extends the pause; counts one only when no pause was holding,
# so ten workers told 429 at once count one pause.
_PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local deadline = tonumber(ARGV[1])
if deadline < 0 then deadline = now + tonumber(ARGV[2]) end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if deadline <= current or deadline <= now then
  return current
end
if current <= now and ARGV[3] ~= '' then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
end
redis.call('SET', KEYS[1], string.format('%d', deadline),
           'PX', math.ceil((deadline - now) / 1000) + 1000)
return deadline
"""

# Sleep at most this long between checks, so a pause that is lifted early (tests, operators
# deleting the key) or a changed rate is noticed without a busy loop.
MAX_SLEEP_S = 1.0
# What the email limiter adds to each interval (worker/lifecycle.py): a provider that counts
# requests in a sliding second sees request k and k+N arrive N intervals apart plus the
# difference of their delays between our grant and its clock (a loaded event loop, the
# request's encoding). Spacing N grants 1 s + this apart keeps N+1 out of any second as long as
# those delays differ by less than this, at a cost of 4% of the rate at N = 5.
SLIDING_WINDOW_ALLOWANCE_S = 0.04
# Why a pause started: a provider's 429, or a halt (the provider refused the account).
PAUSE_REASONS = ("rate_limited", "halted")


class RateLimiter:
    """`acquire()` waits for a global send slot; `pause_until` / `pause_for` stop everyone."""

    def __init__(
        self,
        redis: Redis,
        rate_per_s: float,
        *,
        burst: int = 1,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        window_allowance_s: float = 0.0,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive, got {rate_per_s}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.key_prefix = key_prefix
        # N grants span 1 s + window_allowance_s (SLIDING_WINDOW_ALLOWANCE_S says why).
        self._interval_us = max(1, round(1_000_000 * (1 + window_allowance_s) / rate_per_s))
        self._tat_key = f"{key_prefix}:tat"
        self._pause_key = f"{key_prefix}:paused_until"
        self._halt_key = f"{key_prefix}:halted"
        self._pauses_key = f"{key_prefix}:pauses"
        self._redis = redis
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._pause = redis.register_script(_PAUSE_LUA)

    def __repr__(self) -> str:
        return (
            f"RateLimiter(rate_per_s={self.rate_per_s:g}, burst={self.burst}, "
            f"key_prefix={self.key_prefix!r})"
        )

    async def try_acquire(self) -> float:
        """Take a slot if one is free now: 0.0; else the seconds to wait (nothing taken)."""
        wait_us: Any = await self._acquire(
            keys=[self._tat_key, self._pause_key], args=[self._interval_us, self.burst, "0"]
        )
        return int(wait_us) / 1_000_000

    @property
    def interval_s(self) -> float:
        """The spacing of grants (1 / rate, plus the window allowance)."""
        return self._interval_us / 1_000_000

    async def free_in_s(self) -> float:
        """Seconds until a slot is free (a pause included); 0.0 if one is free now. Takes
        nothing: the batcher looks before its claim and takes the slot after it."""
        wait_us: Any = await self._acquire(
            keys=[self._tat_key, self._pause_key], args=[self._interval_us, self.burst, "1"]
        )
        return int(wait_us) / 1_000_000

    async def acquire(self, *, timeout_s: float | None = None) -> float:
        """Wait until a send is allowed and take the slot; returns the seconds waited.

        Raises `TimeoutError` if no slot came within `timeout_s`, and `ProviderFault` while
        the limiter is halted (nothing is taken then).
        """
        start = time.monotonic()
        while True:
            wait_s = await self.try_acquire()
            if wait_s <= 0:
                return time.monotonic() - start
            # Only a denied caller asks: the common, granted case stays one round trip.
            if (reason := await self.halted()) is not None:
                raise ProviderFault(f"sending is halted: {reason}", wait_s)
            if timeout_s is not None and time.monotonic() - start + wait_s > timeout_s:
                raise TimeoutError(f"no send slot within {timeout_s:g} s")
            await asyncio.sleep(min(wait_s, MAX_SLEEP_S))

    async def pause_until(self, unix_ts: float) -> None:
        """Hold every `acquire` until `unix_ts` (e.g. SendGrid's `X-RateLimit-Reset`)."""
        await self._pause(
            keys=[self._pause_key, self._pauses_key],
            args=[math.ceil(unix_ts * 1_000_000), 0, "rate_limited"],
        )

    async def pause_for(self, seconds: float, *, counted_as: str = "rate_limited") -> None:
        """Hold every `acquire` for `seconds` from now, measured on Redis's clock."""
        await self._pause(
            keys=[self._pause_key, self._pauses_key],
            args=[-1, math.ceil(seconds * 1_000_000), counted_as],
        )

    async def halt(self, seconds: float, reason: str) -> bool:
        """Pause every `acquire` for `seconds` and make it raise `ProviderFault(reason)`.

        True when this call started the halt (so exactly one caller logs it); False when one
        already holds, which this call does not extend: one probe per pause is the point.
        """
        started = await self._redis.set(
            self._halt_key, reason, nx=True, px=max(1, math.ceil(seconds * 1000))
        )
        if started:
            # Not counted as a 429 pause: the halt itself is counted, once.
            await self.pause_for(seconds, counted_as="")
            await cast(Awaitable[int], self._redis.hincrby(self._pauses_key, "halted", 1))
        return bool(started)

    async def pauses(self) -> dict[str, int]:
        """How many pauses ever started, by reason (`PAUSE_REASONS`), zeros filled in."""
        raw = await cast(Awaitable[dict[Any, Any]], self._redis.hgetall(self._pauses_key))
        counts = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
        return {reason: counts.get(reason, 0) for reason in PAUSE_REASONS}

    async def halted(self) -> str | None:
        """The reason sending is halted, or None."""
        raw = await self._redis.get(self._halt_key)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def resume(self) -> None:
        """Lift a halt and any pause now (an operator fixed the key or the domain)."""
        await self._redis.delete(self._halt_key, self._pause_key)

    async def paused_for_s(self) -> float:
        """Seconds the pause still holds (0.0 if none): for status output and tests."""
        wait_s = 0.0
        # try_acquire would take a slot; read the keys and Redis's clock instead.
        redis_now = await self._redis.time()
        now_us = int(redis_now[0]) * 1_000_000 + int(redis_now[1])
        raw = await self._redis.get(self._pause_key)
        if raw is not None:
            wait_s = max(0.0, (int(raw) - now_us) / 1_000_000)
        return wait_s

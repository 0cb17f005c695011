"""What each worker process says about itself, for the console's workers page and `status`.

arq's heartbeat (`<queue>:health-check:<host:pid>`) carries its job counters but not when the
process started or how much memory it holds. Each worker keeps `c360:process:<host:pid>`, a
small hash (`queue`, `started_ms`, `rss_bytes`, `updated_ms`) written at start-up and refreshed
by the lease renewal loop (worker/lease.py) every few seconds; its TTL lets it vanish with a
dead process. Readers look up only the processes whose heartbeat they already found, so a
read costs O(workers).
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

PROCESS_KEY_PREFIX = "c360:process:"
# Several renewals (worker/lease.py RENEW_EVERY_S = 5 s): one late refresh does not lose it.
PROCESS_TTL_S = 30


def process_key(worker: str) -> str:
    return PROCESS_KEY_PREFIX + worker


# (pid, fd) of this process's /proc/self/statm, opened on first use: the recycler reads RSS
# after every job, and building a psutil.Process each time cost ~85 us of a ~3.6 ms send
# (2%); a pread of the kept-open file costs ~13 us. A forked child opens its own.
_statm: tuple[int, int] | None = None
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size (a read of /proc: microseconds, never blocks)."""
    global _statm
    pid = os.getpid()
    try:
        if _statm is None or _statm[0] != pid:
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        # Fields: size resident shared text lib data dt, in pages (proc(5)).
        return int(os.pread(_statm[1], 256, 0).split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):  # no /proc (not Linux): psutil knows the way
        return int(psutil.Process().memory_info().rss)


def describe(pipe: Any, worker: str, queue: str, started_ms: int) -> None:
    """Queue this process's hash (and its TTL) on `pipe`, a Redis pipeline."""
    key = process_key(worker)
    pipe.hset(
        key,
        mapping={
            "queue": queue,
            "started_ms": started_ms,
            "rss_bytes": resident_bytes(),
            "updated_ms": int(time.time() * 1000),
        },
    )
    pipe.expire(key, PROCESS_TTL_S)


async def alive(redis: Any, worker: str) -> bool:
    """Whether the worker process `worker` (`host:pid`) refreshed its hash lately.

    Unknown (Redis unreachable) counts as alive: a live claim must never be taken over.
    """
    try:
        updated_ms = await redis.hget(process_key(worker), "updated_ms")
    except Exception:
        return True
    if updated_ms is None:
        return False
    # Here, not at the top: worker/lease.py imports this module (it writes the hash).
    from worker.lease import LEASE_MS

    # Not refreshed for three renewals: taken for dead (a SIGKILLed worker's hash outlives it
    # by up to PROCESS_TTL_S), after the same time as a job's lease.
    return int(time.time() * 1000) - int(updated_ms) < LEASE_MS


def parse(raw: dict[Any, Any]) -> dict[str, Any]:
    """A process hash (HGETALL, bytes or str) as typed values; {} when it is gone."""
    decoded = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }
    found: dict[str, Any] = {}
    for name in ("started_ms", "rss_bytes", "updated_ms"):
        if decoded.get(name, "").isdigit():
            found[name] = int(decoded[name])
    return found

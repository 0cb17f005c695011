"""The one retry policy: which failures are transient, and how long to wait before the next try.

Transient: connection errors and timeouts (HTTP, Redis, PostgreSQL), HTTP 429 and 5xx, a
PostgreSQL connection terminated by the server, serialization failures and deadlocks, a DNS
lookup that failed, a pool with no free connection, a connection refused or reset (also when
SQLAlchemy wraps the driver's error). Everything else is permanent and fails the job at once
with a message a person can act on.

`decide` is the whole decision after a failed try, a pure function: `worker.job` only carries
it out with arq (its `Retry`, its try counter). A try gets `MAX_RETRIES` retries with backoff;
the last transient failure fails the job ("gave up after N tries"); a job stopped at its hard
time limit is never retried; a `ProviderFault` waits for the operator's fix and gives its try
back. `worker_died` fails a job whose worker died on every try, on the one extra try arq has
(`arq_max_tries`). A try cancelled by a shutdown is not a failure: `worker.job` gives it back.
"""

from __future__ import annotations

import errno
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import time

import asyncpg
import httpx
import redis.exceptions
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from worker.errors import (
    HardTimeLimitExceeded,
    InterruptedAfterProgress,
    PermanentError,
    ProviderFault,
    RateLimited,
    TransientError,
    WorkerDied,
    WorkerError,
)

MAX_RETRY_DELAY_S = 3600.0
# What users read on the job's row when a library failure stopped it; the driver's or the
# library's own text (SQL values, hosts) goes to the logs only (worker.errors).
PUBLIC_DATABASE_ERROR = (
    "the database refused to store this data (an internal error on our side, logged for the "
    "operators); try again later, or contact support if it keeps happening"
)
PUBLIC_UNREACHABLE = "a service this job needs was unreachable"
PUBLIC_INTERNAL_ERROR = (
    "an internal error stopped this job (logged for the operators); try again later, or "
    "contact support if it keeps happening"
)
# PostgreSQL SQLSTATEs worth another try: serialization failure, deadlock, admin/crash
# shutdown, cannot connect now, connection exceptions, too many connections.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",
        "40P01",
        "57P01",
        "57P02",
        "57P03",
        "08000",
        "08001",
        "08003",
        "08004",
        "08006",
        "53300",
    }
)
# A connection that could not be made or broke under us: a restarting server, a failover, a
# peer that reset. asyncpg raises these as plain OSErrors, not all of them ConnectionErrors.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
    }
)


def retry_delay_s(
    try_number: int,
    base_delay_s: float,
    *,
    retry_after_s: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with equal jitter: half the step fixed, half random.

    `try_number` is the try that just failed (1 for the first). The jitter spreads retries
    of many jobs that failed together; a provider's own wait is never shortened.
    """
    step_s: float = min(base_delay_s * 2.0 ** (try_number - 1), MAX_RETRY_DELAY_S)
    delay_s = step_s / 2 + rng() * step_s / 2
    if retry_after_s is not None:
        delay_s = max(delay_s, min(retry_after_s, MAX_RETRY_DELAY_S))
    return delay_s


def retry_after_from_headers(headers: httpx.Headers, now_s: float | None = None) -> float | None:
    """Seconds to wait from `retry-after` (seconds or HTTP date) or `X-RateLimit-Reset` (epoch)."""
    now_s = time() if now_s is None else now_s
    if value := headers.get("retry-after"):
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                reset_at_s: float = parsedate_to_datetime(value).timestamp()
                return max(0.0, reset_at_s - now_s)
            except (TypeError, ValueError):
                return None
    if value := headers.get("x-ratelimit-reset"):
        try:
            return max(0.0, float(value) - now_s)
        except ValueError:
            return None
    return None


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = exc.orig
    for candidate in (orig, getattr(orig, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps (a DBAPIError's `orig`, explicit causes)."""
    current: BaseException | None = exc
    for _ in range(5):  # SQLAlchemy -> its asyncpg adapter -> the driver: a short chain
        if current is None:
            return
        yield current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__


def _network_failure(exc: BaseException) -> BaseException | None:
    """The DNS or socket failure `exc` is, or wraps."""
    for current in _chain(exc):
        # gaierror: DNS during a failover or pod restart; asyncpg raises it raw under SQLAlchemy.
        if isinstance(current, socket.gaierror | ConnectionError):
            return current
        if isinstance(current, OSError) and current.errno in TRANSIENT_ERRNOS:
            return current
    return None


# asyncpg's words when a statement finds the protocol still consuming an error's messages
# (state 2, PROTOCOL_ERROR_CONSUME in asyncpg/protocol/coreproto.pxd): an idle pooled connection
# whose backend was terminated (pg_terminate_backend, a failover) has read the server's FATAL
# message but not yet the socket's close. A lost connection in all but name; the pool drops it
# once asyncpg sees the close.
_ENDED_BY_THE_SERVER = "another operation (2) is in progress"


def _ended_by_the_server(exc: BaseException) -> BaseException | None:
    for current in _chain(exc):
        if isinstance(current, asyncpg.InternalClientError) and _ENDED_BY_THE_SERVER in str(
            current
        ):
            return current
    return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def classify(exc: BaseException) -> WorkerError:
    """The failure as a `TransientError` or a `PermanentError`, with a readable message."""
    if isinstance(exc, WorkerError):
        return exc
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        where = f"{exc.request.method} {exc.request.url.copy_with(query=None)}"
        if response.status_code == 429:
            wait_s = retry_after_from_headers(response.headers)
            return RateLimited(
                f"{where}: 429 Too Many Requests", wait_s or 0.0, public=PUBLIC_UNREACHABLE
            )
        if response.status_code >= 500:
            return TransientError(
                f"{where}: server error {response.status_code}", public=PUBLIC_UNREACHABLE
            )
        return PermanentError(
            f"{where}: {response.status_code} {response.reason_phrase}",
            public=PUBLIC_INTERNAL_ERROR,
        )
    if isinstance(exc, httpx.TransportError):
        return TransientError(f"HTTP {type(exc).__name__}: {exc}", public=PUBLIC_UNREACHABLE)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return TransientError(f"redis: {exc}", public=PUBLIC_UNREACHABLE)
    if isinstance(exc, PoolTimeoutError):
        # Every pooled connection is busy (many jobs, a slow database): not a builtin
        # TimeoutError, but just as likely to pass.
        return TransientError(
            f"database: no free connection in the pool ({exc})", public=PUBLIC_UNREACHABLE
        )
    if (network := _network_failure(exc)) is not None:
        what = "DNS lookup failed" if isinstance(network, socket.gaierror) else "connection failed"
        return TransientError(f"{what}: {_describe(network)}", public=PUBLIC_UNREACHABLE)
    if (ended := _ended_by_the_server(exc)) is not None:
        return TransientError(f"database: connection lost: {ended}", public=PUBLIC_UNREACHABLE)
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or _sqlstate(exc) in TRANSIENT_SQLSTATES:
            return TransientError(
                f"database: {type(exc.orig).__name__}: {exc.orig}", public=PUBLIC_UNREACHABLE
            )
        return PermanentError(
            f"database: {type(exc.orig).__name__}: {exc.orig}", public=PUBLIC_DATABASE_ERROR
        )
    # Raw asyncpg errors: COPY and the import merge run on the driver connection under
    # SQLAlchemy, whose errors then arrive unwrapped.
    if isinstance(exc, asyncpg.PostgresError):
        message = f"database: {type(exc).__name__}: {exc}"
        if getattr(exc, "sqlstate", None) in TRANSIENT_SQLSTATES:
            return TransientError(message, public=PUBLIC_UNREACHABLE)
        return PermanentError(message, public=PUBLIC_DATABASE_ERROR)
    if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
        # The connection died under us.
        return TransientError(f"database: {exc}", public=PUBLIC_UNREACHABLE)
    if isinstance(exc, TimeoutError):
        return TransientError(_describe(exc), public=PUBLIC_UNREACHABLE)
    if isinstance(exc, OSError) and exc.errno is None and "connect" in str(exc).lower():
        # asyncpg raises bare OSError("Multiple exceptions: ...") when every address refuses.
        return TransientError(f"connection failed: {exc}", public=PUBLIC_UNREACHABLE)
    return PermanentError(_describe(exc), public=PUBLIC_INTERNAL_ERROR)


@dataclass(frozen=True, slots=True)
class RetryIn:
    """Run the job again in `defer_s` seconds. `why` opens the log line.

    `give_try_back`: the failure was not the job's (a refused account), or the try moved the
    job on before it failed (`InterruptedAfterProgress`), so it must not count towards
    `MAX_RETRIES`.
    """

    defer_s: float
    error: WorkerError
    why: str
    give_try_back: bool = False


@dataclass(frozen=True, slots=True)
class Fail:
    """Fail the job now: `error` goes to the log, its `public_message` to the job's row."""

    error: WorkerError


def decide(
    exc: BaseException,
    *,
    job_try: int,
    max_retries: int,
    base_delay_s: float,
    ran_past_hard_limit_s: float | None = None,
    rng: Callable[[], float] = random.random,
) -> RetryIn | Fail:
    """What to do after try `job_try` (1 for the first) failed with `exc`.

    `ran_past_hard_limit_s` is the hard limit when the job was stopped at it.
    """
    if ran_past_hard_limit_s is not None:
        # Never retried: a job that ran that long will run that long again (imports avoid it
        # by checkpointing at the soft limit).
        return Fail(
            HardTimeLimitExceeded(
                f"stopped: ran past the hard time limit of {ran_past_hard_limit_s:g} s "
                "(JOB_TIMEOUT_S)"
            )
        )
    failure = classify(exc)
    if isinstance(failure, ProviderFault):
        # Not this job's fault and not one more tries would fix: wait for the operator (one
        # probe per pause, worker.ratelimit) without using up a try, so the first try's step.
        defer_s = retry_delay_s(1, base_delay_s, retry_after_s=failure.retry_after_s, rng=rng)
        return RetryIn(defer_s, failure, "provider refused the account", give_try_back=True)
    if not isinstance(failure, TransientError):
        return Fail(failure)
    if isinstance(failure, InterruptedAfterProgress):
        # The first try's short step: the job was moving, not failing over and over.
        defer_s = retry_delay_s(1, base_delay_s, rng=rng)
        return RetryIn(defer_s, failure, "interrupted after progress", give_try_back=True)
    if job_try <= max_retries:
        wait_s = failure.retry_after_s if isinstance(failure, RateLimited) else None
        defer_s = retry_delay_s(job_try, base_delay_s, retry_after_s=wait_s, rng=rng)
        return RetryIn(defer_s, failure, "transient failure")
    return Fail(
        PermanentError(
            f"gave up after {job_try} tries; last error: {failure}",
            public=f"gave up after {job_try} tries: {failure.public_message}; try again later",
        )
    )


def max_tries(max_retries: int) -> int:
    """The tries a job (or an email's attempts) gets: the first and `max_retries` more."""
    return max_retries + 1


def arq_max_tries(max_retries: int) -> int:
    """The tries arq allows: ours (the first and `max_retries` more) and one beyond.

    `decide` stops retrying before arq would; the extra try only comes when the worker died
    on the last of ours, and lets `worker_died` fail the job with its reason instead of arq
    dropping it without calling our code.
    """
    return max_tries(max_retries) + 1


def worker_died(job_try: int, *, max_retries: int, deaths: int) -> Fail | None:
    """Fail, on the extra try (`arq_max_tries`), a job whose worker died on every try of ours.

    `deaths` is how many tries ended with their worker gone (worker.stats).
    """
    if job_try <= max_tries(max_retries):
        return None
    return Fail(
        WorkerDied(
            f"the worker died {deaths} times while running this job (killed or out of memory); "
            "not trying again"
        )
    )

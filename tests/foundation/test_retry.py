"""The retry policy: what is transient, the backoff values, the decision after a failed try,
and how a real worker applies them."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis.exceptions
from arq.connections import ArqRedis
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from tests.conftest import RunBurst
from worker import errors
from worker.context import Ctx
from worker.errors import PermanentError, RateLimited, TransientError
from worker.job import job
from worker.retry import (
    PUBLIC_DATABASE_ERROR,
    PUBLIC_INTERNAL_ERROR,
    PUBLIC_UNREACHABLE,
    Fail,
    RetryIn,
    arq_max_tries,
    classify,
    decide,
    retry_after_from_headers,
    retry_delay_s,
    worker_died,
)
from worker.serialization import RemoteJobError
from worker.settings import Settings


@pytest.mark.parametrize(
    ("try_number", "rng_value", "expected_s"),
    [(1, 0.0, 30.0), (1, 1.0, 60.0), (2, 0.0, 60.0), (2, 0.5, 90.0), (3, 1.0, 240.0)],
)
def test_backoff_doubles_per_try_with_equal_jitter(
    try_number: int, rng_value: float, expected_s: float
) -> None:
    assert retry_delay_s(try_number, 60, rng=lambda: rng_value) == expected_s


def test_backoff_never_shortens_the_providers_wait_and_is_capped() -> None:
    assert retry_delay_s(1, 1, retry_after_s=42, rng=lambda: 0.0) == 42
    assert retry_delay_s(30, 60, rng=lambda: 1.0) == 3600


def test_retry_after_headers() -> None:
    assert retry_after_from_headers(httpx.Headers({"retry-after": "7"})) == 7
    reset = httpx.Headers({"X-RateLimit-Reset": "1000030"})
    assert retry_after_from_headers(reset, now_s=1_000_000) == 30
    http_date = httpx.Headers({"retry-after": "Thu, 01 Jan 1970 00:00:50 GMT"})
    assert retry_after_from_headers(http_date, now_s=20) == 30
    assert retry_after_from_headers(httpx.Headers({"retry-after": "soon"})) is None


def _status_error(code: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://api.example.com/emails?key=secret")
    response = httpx.Response(code, headers=headers, request=request)
    return httpx.HTTPStatusError("boom", request=request, response=response)


def test_classification_of_http_failures() -> None:
    limited = classify(_status_error(429, {"retry-after": "12"}))
    assert isinstance(limited, RateLimited) and limited.retry_after_s == 12
    assert type(classify(_status_error(503))) is TransientError
    rejected = classify(_status_error(422))
    assert type(rejected) is PermanentError
    assert str(rejected) == "POST https://api.example.com/emails: 422 Unprocessable Entity"
    assert "secret" not in str(limited) + str(rejected)
    assert type(classify(httpx.ConnectError("refused"))) is TransientError
    assert type(classify(httpx.ReadTimeout("slow"))) is TransientError


def test_classification_of_connection_and_bug_failures() -> None:
    assert type(classify(redis.exceptions.ConnectionError("gone"))) is TransientError
    assert type(classify(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))) is TransientError
    assert type(classify(TimeoutError())) is TransientError
    assert str(classify(KeyError("email"))) == "KeyError: 'email'"
    assert type(classify(ValueError("bad"))) is PermanentError
    own = TransientError("mine")
    assert classify(own) is own


def test_dns_pool_and_socket_failures_are_transient() -> None:
    """A failover's DNS blip, a pool wait past its timeout, a reset: the next try may pass."""
    dns = classify(socket.gaierror(-3, "Temporary failure in name resolution"))
    assert type(dns) is TransientError
    assert (
        str(dns) == "DNS lookup failed: gaierror: [Errno -3] Temporary failure in name resolution"
    )
    pool = PoolTimeoutError("QueuePool limit of size 10 overflow 10 reached")
    assert type(classify(pool)) is TransientError
    for code in (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE, errno.EHOSTUNREACH):
        assert type(classify(OSError(code, "socket trouble"))) is TransientError
    # The same, wrapped by SQLAlchemy (its asyncpg adapter chains the driver's error as cause).
    adapted = RuntimeError("adapted driver error")
    adapted.__cause__ = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    wrapped = InterfaceError("SELECT 1", None, adapted)
    assert type(classify(wrapped)) is TransientError
    assert type(classify(DBAPIError("SELECT 1", None, socket.gaierror(-2, "unknown")))) is (
        TransientError
    )
    # Other OS errors stay permanent: a missing file will still be missing.
    assert type(classify(FileNotFoundError(errno.ENOENT, "no such file"))) is PermanentError


def test_library_failures_tell_users_plain_words_and_keep_the_detail_for_the_log() -> None:
    violation = asyncpg.CheckViolationError(
        'new row violates check constraint "ck_city"\nDETAIL: Failing row contains (a@x.io)'
    )
    failure = classify(violation)
    assert "ck_city" in str(failure) and "a@x.io" in str(failure)
    assert failure.public_message == PUBLIC_DATABASE_ERROR
    assert classify(KeyError("email")).public_message == PUBLIC_INTERNAL_ERROR
    # Our own errors are written for users already (a CSV problem, a missing row).
    assert PermanentError("the file is empty").public_message == "the file is empty"


def test_classification_of_raw_asyncpg_errors() -> None:
    """COPY and the import merge use the driver connection: its errors arrive unwrapped."""
    shutdown = classify(asyncpg.AdminShutdownError("terminating connection"))
    assert type(shutdown) is TransientError
    assert str(shutdown) == "database: AdminShutdownError: terminating connection"
    assert type(classify(asyncpg.ConnectionDoesNotExistError("gone"))) is TransientError
    assert type(classify(asyncpg.DeadlockDetectedError("deadlock"))) is TransientError
    assert type(classify(asyncpg.InterfaceError("connection is closed"))) is TransientError
    broken = classify(asyncpg.UndefinedTableError('relation "nope" does not exist'))
    assert type(broken) is PermanentError
    assert str(broken) == 'database: UndefinedTableError: relation "nope" does not exist'
    assert type(classify(asyncpg.InterfaceError("another operation is in progress"))) is (
        PermanentError
    )


def test_a_statement_on_a_connection_whose_backend_just_ended_is_transient() -> None:
    """asyncpg's words when an idle pooled connection's backend was terminated and the next
    statement runs before the socket's close is read (seen under pg_terminate_backend)."""
    ended = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (2) is in progress"
    )
    failure = classify(ended)
    assert type(failure) is TransientError and "connection lost" in str(failure)
    # Through SQLAlchemy's adapter, as the lease's statements raise it.
    adapted = RuntimeError("adapted")
    adapted.__cause__ = ended
    assert type(classify(DBAPIError("SET LOCAL lock_timeout", None, adapted))) is TransientError
    # Any other protocol state is our own misuse of a connection: a bug, not retried.
    misuse = asyncpg.InternalClientError(
        "cannot switch to state 15; another operation (12) is in progress"
    )
    assert type(classify(misuse)) is PermanentError


async def test_terminated_database_connection_is_transient(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as victim, sessions() as killer:
        pid = await victim.scalar(text("SELECT pg_backend_pid()"))
        await killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as caught:
            await victim.execute(text("SELECT 1"))
    assert type(classify(caught.value)) is TransientError


async def test_sql_error_is_permanent(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        with pytest.raises(DBAPIError) as caught:
            await session.execute(text("SELECT * FROM no_such_table"))
    failure = classify(caught.value)
    assert type(failure) is PermanentError
    assert "no_such_table" in str(failure)


def _decide(exc: BaseException, job_try: int, **options: Any) -> RetryIn | Fail:
    """`decide` with MAX_RETRIES=3, a 60 s base and the jitter at its low end."""
    return decide(exc, job_try=job_try, max_retries=3, base_delay_s=60, rng=lambda: 0.0, **options)


def test_decide_retries_a_transient_failure_with_the_backoff_of_its_try() -> None:
    failure = httpx.ConnectError("refused")
    first = _decide(failure, job_try=1)
    assert isinstance(first, RetryIn) and (first.defer_s, first.why) == (30.0, "transient failure")
    assert type(first.error) is TransientError and str(first.error) == "HTTP ConnectError: refused"
    later = _decide(failure, job_try=3)
    assert isinstance(later, RetryIn) and later.defer_s == 120.0 and not later.give_try_back


def test_decide_waits_at_least_as_long_as_a_rate_limit_asks() -> None:
    limited = RateLimited("429", retry_after_s=500)
    assert _decide(limited, job_try=1) == RetryIn(500.0, limited, "transient failure")


def test_decide_gives_up_after_the_last_retry_with_plain_words_for_the_row() -> None:
    failure = _decide(httpx.ConnectError("refused"), job_try=4)
    assert isinstance(failure, Fail) and type(failure.error) is PermanentError
    assert str(failure.error) == "gave up after 4 tries; last error: HTTP ConnectError: refused"
    assert failure.error.public_message == (
        f"gave up after 4 tries: {PUBLIC_UNREACHABLE}; try again later"
    )
    never = decide(TimeoutError(), job_try=1, max_retries=0, base_delay_s=60)
    assert isinstance(never, Fail) and str(never.error).startswith("gave up after 1 tries")


def test_decide_fails_a_permanent_failure_at_once() -> None:
    own = PermanentError("row 7: email missing")
    assert _decide(own, job_try=1) == Fail(own)
    bug = _decide(KeyError("email"), job_try=1)
    assert isinstance(bug, Fail) and type(bug.error) is PermanentError
    assert str(bug.error) == "KeyError: 'email'"
    assert bug.error.public_message == PUBLIC_INTERNAL_ERROR


def test_decide_never_retries_a_job_stopped_at_its_hard_limit() -> None:
    """asyncio.timeout raises TimeoutError, which alone would be transient."""
    stopped = _decide(TimeoutError(), job_try=1, ran_past_hard_limit_s=0.3)
    assert isinstance(stopped, Fail) and type(stopped.error) is errors.HardTimeLimitExceeded
    assert str(stopped.error) == "stopped: ran past the hard time limit of 0.3 s (JOB_TIMEOUT_S)"


def test_decide_lets_a_provider_fault_wait_for_the_fix_without_using_a_try() -> None:
    fault = errors.ProviderFault("resend answered 401: invalid_api_key", retry_after_s=0.0)
    # Past the last retry too, and with the first try's backoff, not the fourth's.
    assert _decide(fault, job_try=4) == RetryIn(
        30.0, fault, "provider refused the account", give_try_back=True
    )
    paused = _decide(errors.ProviderFault("403", retry_after_s=300.0), job_try=1)
    assert isinstance(paused, RetryIn) and paused.defer_s == 300.0


def test_a_job_whose_worker_died_on_every_try_fails_on_arqs_extra_try() -> None:
    assert arq_max_tries(3) == 5
    assert worker_died(4, max_retries=3, deaths=3) is None  # the last of ours: run it
    died = worker_died(5, max_retries=3, deaths=4)
    assert isinstance(died, Fail) and type(died.error) is errors.WorkerDied
    assert str(died.error) == (
        "the worker died 4 times while running this job (killed or out of memory); not trying again"
    )


tries: list[int] = []
failures: list[tuple[dict[str, Any], str]] = []


async def remember_failure(ctx: Ctx, kwargs: dict[str, Any], message: str) -> None:
    failures.append((kwargs, message))


@job(on_failure=remember_failure)
async def flaky(ctx: Ctx, fail_times: int) -> str:
    tries.append(ctx["job_try"])
    if len(tries) <= fail_times:
        raise httpx.ConnectError("provider unreachable")
    return "done"


@job(on_failure=remember_failure)
async def broken(ctx: Ctx) -> None:
    tries.append(ctx["job_try"])
    raise PermanentError("row 7: email missing")


@job(on_failure=remember_failure, timeout_cap_s=0.3)
async def endless(ctx: Ctx) -> None:
    tries.append(ctx["job_try"])
    await asyncio.sleep(30)


@job(on_failure=remember_failure)
async def query_database(ctx: Ctx) -> int:
    """One query through the worker's own engine (whose host the test chooses)."""
    tries.append(ctx["job_try"])
    async with ctx["sessions"]() as session:
        return int(await session.scalar(text("SELECT 1")) or 0)


starved: list[AsyncEngine] = []


@job(on_failure=remember_failure)
async def query_while_pool_is_taken(ctx: Ctx) -> str:
    """The first try finds the only pooled connection taken; the next one gets it."""
    tries.append(ctx["job_try"])
    [engine] = starved
    if ctx["job_try"] == 1:
        async with engine.connect() as held:
            await held.execute(text("SELECT 1"))
            async with engine.connect() as second:  # waits pool_timeout, then gives up
                await second.execute(text("SELECT 1"))
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return "done"


@pytest.fixture
async def one_connection_pool(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(settings.database, pool_size=1, max_overflow=0, pool_timeout=0.2)
    starved.append(engine)
    yield engine
    starved.clear()
    await engine.dispose()


@pytest.fixture(autouse=True)
def _reset() -> None:
    tries.clear()
    failures.clear()


async def test_transient_failures_retry_with_backoff_then_succeed(
    arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    queued = await arq_redis.enqueue_job("flaky", fail_times=2, _queue_name="default")
    assert queued is not None
    worker = await run_burst("default", jobs=[flaky])
    assert tries == [1, 2, 3]
    assert (worker.jobs_retried, worker.jobs_complete, worker.jobs_failed) == (2, 1, 0)
    assert await queued.result(timeout=1) == "done"
    assert failures == []


async def test_transient_failures_give_up_after_max_retries(
    arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    queued = await arq_redis.enqueue_job("flaky", fail_times=99, _queue_name="default")
    assert queued is not None
    await run_burst("default", jobs=[flaky])
    assert tries == [1, 2, 3, 4]  # MAX_RETRIES=3 retries after the first try
    with pytest.raises(
        RemoteJobError, match="gave up after 4 tries; last error: HTTP ConnectError"
    ):
        await queued.result(timeout=1)
    # The job's own row gets plain words; the result and the log keep the detail.
    assert failures == [
        (
            {"fail_times": 99},
            "gave up after 4 tries: a service this job needs was unreachable; try again later",
        )
    ]


async def test_permanent_failure_fails_at_once_and_is_recorded(
    arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    queued = await arq_redis.enqueue_job("broken", _queue_name="default")
    assert queued is not None
    await run_burst("default", jobs=[broken])
    assert tries == [1]
    with pytest.raises(RemoteJobError, match="row 7: email missing"):
        await queued.result(timeout=1)
    assert failures == [({}, "row 7: email missing")]


async def test_hard_time_limit_stops_the_job_records_it_and_does_not_retry(
    arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    queued = await arq_redis.enqueue_job("endless", _queue_name="default")
    assert queued is not None
    await run_burst("default", jobs=[endless])
    assert tries == [1]
    with pytest.raises(RemoteJobError, match=r"hard time limit of 0\.3 s"):
        await queued.result(timeout=1)
    assert failures == [({}, "stopped: ran past the hard time limit of 0.3 s (JOB_TIMEOUT_S)")]


async def test_a_database_host_that_does_not_resolve_is_retried_not_failed(
    arq_redis: ArqRedis, run_burst: RunBurst, settings: Settings
) -> None:
    """DNS is down (or the name is gone for a while): every try is retried with backoff."""
    unresolvable = settings.model_copy(
        update={"database_url": "postgresql+asyncpg://postgres@db.contact360.invalid:5432/x"}
    )
    queued = await arq_redis.enqueue_job("query_database", _queue_name="default")
    assert queued is not None
    worker = await run_burst("default", jobs=[query_database], settings_=unresolvable)
    assert tries == [1, 2, 3, 4]
    assert worker.jobs_retried == 3
    with pytest.raises(RemoteJobError, match="last error: DNS lookup failed: gaierror"):
        await queued.result(timeout=1)
    [(_, message)] = failures
    assert message.startswith("gave up after 4 tries: a service this job needs was unreachable")


async def test_an_exhausted_pool_is_retried_not_failed(
    arq_redis: ArqRedis, run_burst: RunBurst, one_connection_pool: AsyncEngine
) -> None:
    queued = await arq_redis.enqueue_job("query_while_pool_is_taken", _queue_name="default")
    assert queued is not None
    worker = await run_burst("default", jobs=[query_while_pool_is_taken])
    assert tries == [1, 2]
    assert (worker.jobs_retried, worker.jobs_complete, worker.jobs_failed) == (1, 1, 0)
    assert await queued.result(timeout=1) == "done"
    assert failures == []

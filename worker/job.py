"""How every job runs: log context, soft and hard time limits, the retry policy, failure records.

Jobs are plain coroutines `async def name(ctx: Ctx, **kwargs) -> SomeResult`. `JobDefinition`
wraps one for arq, so every job gets the same behaviour without repeating it; it is generic in
the coroutine's parameters and result (`JobDefinition[P, R]`), so `run(ctx, ...)` and
`coroutine(ctx, ...)` are checked against the job's own signature:

- logs carry the job id, name and try number;
- `ctx["soft_deadline"]` tells a long job when to checkpoint and continue in a fresh try;
- past the hard limit the job is stopped (and not retried: `worker.retry.decide`);
- what a failure means is `worker.retry.decide`'s call (retry how soon, give the try back, or
  fail), and a poison pill's is `worker.retry.worker_died`'s; this module carries it out with
  arq: its `Retry(defer=...)`, its try counter, and for a failure a log line with the whole
  detail while `on_failure` records the error's `public_message` on the job's own row
  (import, export, email), plain words without hosts, buckets, paths or SQL values;
- a try cancelled by a shutdown goes back to the queue without using up a try;
- an import or export waits for its turn among its user's jobs (worker/fairness/) before
  its body runs: over the user's cap it is parked and gives its worker slot back at once,
  and when it ends its user's next job is woken;
- outcomes, durations and queue waits are counted in Redis for `python -m worker status` and
  `/metrics` (worker/stats.py);
- with OpenTelemetry installed, each try runs in a span of its own (worker/tracing.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast

from arq.constants import retry_key_prefix
from arq.cron import CronJob, cron
from arq.typing import WorkerCoroutine
from arq.worker import Function, Retry

from worker import fairness, stats
from worker.context import Ctx
from worker.errors import TransientError, WorkerError
from worker.logs import job_log_context
from worker.retry import (
    PUBLIC_INTERNAL_ERROR,
    Fail,
    arq_max_tries,
    classify,
    decide,
    retry_delay_s,
    worker_died,
)
from worker.settings import Settings
from worker.tracing import job_span

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
# A job's coroutine: the ctx, then the job's own arguments (CONTRACT §5).
JobCoroutine = Callable[Concatenate[Ctx, P], Awaitable[R]]
FailureHook = Callable[[Ctx, dict[str, Any], str], Awaitable[None]]
# arq's own timeout stays a backstop behind ours, so our failure record gets written first.
ARQ_TIMEOUT_GRACE_S = 30.0


async def _give_try_back(ctx: Ctx) -> None:
    try:
        await ctx["redis"].decr(retry_key_prefix + ctx["job_id"])
    except Exception as exc:
        log.warning("could not give the try of a cancelled job back: %s", exc)


async def _take_turn(ctx: Ctx) -> fairness.Claim | None:
    """The try's turn among its user's jobs (worker/fairness/); parked: `Retry(defer=0)`."""
    try:
        claim = await fairness.claim(ctx)
    except Exception as exc:
        failure = classify(exc)
        if not isinstance(failure, TransientError):
            # A bug of ours must not stop users' work: run this try without a turn.
            log.exception("could not take a turn among the user's jobs; running without one")
            return None
        # Not the job's fault (Redis or PostgreSQL unreachable): come back, try given back.
        defer_s = retry_delay_s(1, ctx["settings"].retry_base_delay_s)
        log.warning(
            "could not take a turn among the user's jobs, again in %.1f s: %s", defer_s, failure
        )
        await _give_try_back(ctx)
        raise Retry(defer=defer_s) from exc
    if claim is None or claim.admitted:
        return claim
    share = claim.share
    log.info(
        "waiting for its turn: user %s runs at most %d %s job(s) at once (%s_MAX_RUNNING_PER_USER)",
        share.user_id,
        share.cap,
        share.kind,
        share.kind.upper(),
    )
    # The claim moved the job's score ahead and gave its try back; defer=0 makes arq keep
    # that score (it only adds a non-zero defer) and free the worker slot now.
    raise Retry(defer=0)


async def _end_turn(ctx: Ctx, claim: fairness.Claim) -> None:
    try:
        await fairness.release(ctx["redis"], claim)
    except Exception as exc:
        # The user's parked jobs then look again on their own (fairness.PARK_RECHECK_S).
        log.warning("could not end the turn of %s: %s", claim.job_id, exc)


@dataclass(frozen=True)
class JobDefinition(Generic[P, R]):
    """A job coroutine and how it runs; `to_arq` builds arq's `Function` once settings are known."""

    coroutine: JobCoroutine[P, R]
    name: str
    # None: JOB_TIMEOUT_S. Short jobs set a cap so a crashed one is not held for 30 minutes.
    timeout_cap_s: float | None = None
    on_failure: FailureHook | None = None

    def hard_timeout_s(self, settings: Settings) -> float:
        limit_s = settings.job_timeout_s
        return limit_s if self.timeout_cap_s is None else min(limit_s, self.timeout_cap_s)

    def arq_coroutine(self) -> WorkerCoroutine:
        async def run(arq_ctx: dict[str, Any], *args: P.args, **kwargs: P.kwargs) -> R:
            return await self.run(cast(Ctx, arq_ctx), *args, **kwargs)

        run.__qualname__ = run.__name__ = self.name
        return cast(WorkerCoroutine, run)

    def to_arq(self, settings: Settings) -> Function:
        return Function(
            name=self.name,
            coroutine=self.arq_coroutine(),
            timeout_s=self.hard_timeout_s(settings) + ARQ_TIMEOUT_GRACE_S,
            keep_result_s=None,
            keep_result_forever=None,
            max_tries=None,
        )

    async def run(self, ctx: Ctx, *args: P.args, **kwargs: P.kwargs) -> R:
        settings = ctx["settings"]
        job_try = ctx["job_try"]
        job_id = ctx["job_id"]
        started_s, started_monotonic = time.time(), time.monotonic()
        with (
            job_log_context(job_id=job_id, job=self.name, job_try=job_try),
            job_span(self.name, queue=ctx["queue_name"], job_id=job_id, job_try=job_try),
        ):
            # Before the try is counted: a parked try is no try at all.
            turn = await _take_turn(ctx)
            try:
                deaths = await stats.try_started(ctx["redis"], ctx["queue_name"], job_id, self.name)
            except Exception:
                # Before the try below: its `finally` would not give the turn back, and the
                # user's parked jobs would wait for their recheck (fairness.PARK_RECHECK_S).
                if turn is not None:
                    await asyncio.shield(_end_turn(ctx, turn))
                raise
            outcome: stats.Outcome = "failed"
            error: str | None = None
            # A shutdown's cancel keeps the turn: arq requeues the job, which resumes first.
            keep_turn = False
            try:
                died = worker_died(job_try, max_retries=settings.max_retries, deaths=deaths)
                if died is not None:
                    raise died.error
                result = await self._run_with_limits(ctx, job_try, *args, **kwargs)
                outcome = "completed"
                return result
            except Retry:
                outcome = "retried"
                raise
            except asyncio.CancelledError:
                # A shutdown past its grace: arq puts the job back in the queue. That is not
                # the job's fault, so give arq's try back (arq counts it when the job starts).
                outcome = "retried"
                keep_turn = True
                await asyncio.shield(_give_try_back(ctx))
                raise
            except Exception as exc:
                error = str(exc)
                log.error("job failed: %s", error)
                public = exc.public_message if isinstance(exc, WorkerError) else None
                await self._record_failure(ctx, kwargs, public or PUBLIC_INTERNAL_ERROR)
                raise
            finally:
                redis = ctx["redis"]
                if turn is not None and not keep_turn:
                    await asyncio.shield(_end_turn(ctx, turn))
                await asyncio.shield(
                    stats.try_ended(redis, job_id, final=outcome in ("completed", "failed"))
                )
                await asyncio.shield(
                    stats.record(
                        redis,
                        ctx["queue_name"],
                        outcome,
                        job_id=job_id,
                        job=self.name,
                        job_try=job_try,
                        error=error,
                        duration_s=time.monotonic() - started_monotonic,
                        queue_wait_s=stats.queue_wait_s(ctx["score"], started_s),
                    )
                )

    async def _run_with_limits(
        self, ctx: Ctx, job_try: int, *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """The job under its soft and hard limits; failures become `Retry` or a `WorkerError`."""
        settings = ctx["settings"]
        loop = asyncio.get_running_loop()
        hard_s = self.hard_timeout_s(settings)
        soft_s = min(settings.job_soft_timeout_s, hard_s * 0.9)
        ctx["soft_deadline"] = loop.time() + soft_s
        deadline = asyncio.timeout(hard_s)
        try:
            async with deadline:
                return await self.coroutine(ctx, *args, **kwargs)
        except Exception as exc:
            decision = decide(
                exc,
                job_try=job_try,
                max_retries=settings.max_retries,
                base_delay_s=settings.retry_base_delay_s,
                ran_past_hard_limit_s=hard_s if deadline.expired() else None,
            )
            if isinstance(decision, Fail):
                raise decision.error from exc
            if decision.give_try_back:
                await _give_try_back(ctx)
            log.warning("%s, retry in %.1f s: %s", decision.why, decision.defer_s, decision.error)
            raise Retry(defer=decision.defer_s) from exc

    async def _record_failure(self, ctx: Ctx, kwargs: dict[str, Any], message: str) -> None:
        if self.on_failure is None:
            return
        try:
            # Shielded: a shutdown cancelling this job must not lose the failure record.
            await asyncio.shield(self.on_failure(ctx, kwargs, message))
        except Exception:
            log.exception("could not record the failure of %s", self.name)


# Any job, whatever its arguments and result: what a queue's worker registers.
AnyJob = JobDefinition[..., Any]


def job(
    *,
    name: str | None = None,
    timeout_cap_s: float | None = None,
    on_failure: FailureHook | None = None,
) -> Callable[[JobCoroutine[P, R]], JobDefinition[P, R]]:
    """Decorator: `@job(on_failure=...)` over `async def process_x(ctx: Ctx, ...) -> XResult`."""

    def wrap(coroutine: JobCoroutine[P, R]) -> JobDefinition[P, R]:
        return JobDefinition(
            coroutine=coroutine,
            name=name or coroutine.__name__,
            timeout_cap_s=timeout_cap_s,
            on_failure=on_failure,
        )

    return wrap


@dataclass(frozen=True)
class CronSchedule:
    """A job that the default worker enqueues on a UTC schedule (arq's `cron`, unique per tick)."""

    # A cron job takes no arguments of its own: arq calls it with the ctx alone.
    job: JobDefinition[[], Any]
    hour: int | set[int] | None = None
    minute: int | set[int] | None = None

    def to_arq(self, settings: Settings) -> CronJob:
        return cron(
            self.job.arq_coroutine(),
            name=self.job.name,
            hour=self.hour,
            minute=self.minute,
            # unique=True: with several default workers, each tick is enqueued under one job id.
            unique=True,
            timeout=self.job.hard_timeout_s(settings) + ARQ_TIMEOUT_GRACE_S,
            max_tries=arq_max_tries(settings.max_retries),
            keep_result=settings.keep_result_s,
        )

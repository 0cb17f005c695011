"""How every job runs: log context, soft and hard time limits, the retry policy, failure records.

Jobs are plain coroutines `async def name(ctx: Ctx, **kwargs)`. `JobDefinition` wraps one for
arq, so every job gets the same behaviour without repeating it:

- logs carry the job id, name and try number;
- `ctx["soft_deadline"]` tells a long job when to checkpoint and continue in a fresh try;
- past the hard limit the job is stopped and recorded as failed. It is not retried: a job that
  ran that long will run that long again (imports avoid it with the soft limit);
- a transient failure becomes arq's `Retry` with exponential backoff, at most `MAX_RETRIES`
  times; a permanent one (or the last transient one) fails now: the log line gets the whole
  detail, and `on_failure` records the error's `public_message` on the job's own row (import,
  export, email), plain words without hosts, buckets, paths or SQL values;
- a job whose worker died on every allowed try (a poison pill) is failed, with that reason, on
  the one extra try arq is given for it, instead of arq dropping it without calling our code;
- a try cancelled by a shutdown goes back to the queue without using up a try, and so does
  one that met a `ProviderFault` (the provider refused our account): it waits for the fix;
- outcomes are counted in Redis for `python -m worker status` (worker/stats.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from arq.constants import retry_key_prefix
from arq.cron import CronJob, cron
from arq.typing import WorkerCoroutine
from arq.worker import Function, Retry

from worker import stats
from worker.context import Ctx
from worker.errors import PermanentError, ProviderFault, RateLimited, TransientError, WorkerError
from worker.logs import job_log_context
from worker.retry import PUBLIC_INTERNAL_ERROR, classify, retry_delay_s
from worker.settings import Settings

log = logging.getLogger(__name__)

JobCoroutine = Callable[..., Awaitable[Any]]
FailureHook = Callable[[Ctx, dict[str, Any], str], Awaitable[None]]
# arq's own timeout stays a backstop behind ours, so our failure record gets written first.
ARQ_TIMEOUT_GRACE_S = 30.0


class HardTimeLimitExceeded(PermanentError):
    """The job ran past its hard time limit and was stopped."""


class WorkerDied(PermanentError):
    """The job's worker process died on every try (a poison pill): the job is not run again."""


async def _give_try_back(ctx: Ctx) -> None:
    try:
        await ctx["redis"].decr(retry_key_prefix + ctx["job_id"])
    except Exception as exc:
        log.warning("could not give the try of a cancelled job back: %s", exc)


@dataclass(frozen=True)
class JobDefinition:
    """A job coroutine and how it runs; `to_arq` builds arq's `Function` once settings are known."""

    coroutine: JobCoroutine
    name: str
    # None: JOB_TIMEOUT_S. Short jobs set a cap so a crashed one is not held for 30 minutes.
    timeout_cap_s: float | None = None
    on_failure: FailureHook | None = None

    def hard_timeout_s(self, settings: Settings) -> float:
        limit_s = settings.job_timeout_s
        return limit_s if self.timeout_cap_s is None else min(limit_s, self.timeout_cap_s)

    def arq_coroutine(self) -> WorkerCoroutine:
        async def run(arq_ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
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

    async def run(self, ctx: Ctx, *args: Any, **kwargs: Any) -> Any:
        settings = ctx["settings"]
        job_try = ctx["job_try"]
        job_id = ctx["job_id"]
        with job_log_context(job_id=job_id, job=self.name, job_try=job_try):
            deaths = await stats.try_started(ctx["redis"], ctx["queue_name"], job_id)
            outcome: stats.Outcome = "failed"
            error: str | None = None
            try:
                if job_try > settings.max_retries + 1:
                    # arq allows one try beyond ours (worker_settings), so a job whose worker
                    # keeps dying reaches this line instead of arq failing it silently.
                    raise WorkerDied(
                        f"the worker died {deaths} times while running this job "
                        f"(killed or out of memory); not trying again"
                    )
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
                    )
                )

    async def _run_with_limits(self, ctx: Ctx, job_try: int, *args: Any, **kwargs: Any) -> Any:
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
            if deadline.expired():
                failure: Exception = HardTimeLimitExceeded(
                    f"stopped: ran past the hard time limit of {hard_s:g} s (JOB_TIMEOUT_S)"
                )
            else:
                failure = classify(exc)
            if isinstance(failure, ProviderFault):
                # Not this job's fault and not one more tries would fix: wait for the operator
                # (one probe per pause, worker.ratelimit) without using up a try.
                await _give_try_back(ctx)
                defer_s = retry_delay_s(
                    1, settings.retry_base_delay_s, retry_after_s=failure.retry_after_s
                )
                log.warning("provider refused the account, retry in %.1f s: %s", defer_s, failure)
                raise Retry(defer=defer_s) from exc
            if isinstance(failure, TransientError):
                if job_try <= settings.max_retries:
                    wait_s = failure.retry_after_s if isinstance(failure, RateLimited) else None
                    defer_s = retry_delay_s(
                        job_try, settings.retry_base_delay_s, retry_after_s=wait_s
                    )
                    log.warning("transient failure, retry in %.1f s: %s", defer_s, failure)
                    raise Retry(defer=defer_s) from exc
                failure = PermanentError(
                    f"gave up after {job_try} tries; last error: {failure}",
                    public=f"gave up after {job_try} tries: {failure.public_message}; "
                    "try again later",
                )
            raise failure from exc

    async def _record_failure(self, ctx: Ctx, kwargs: dict[str, Any], message: str) -> None:
        if self.on_failure is None:
            return
        try:
            # Shielded: a shutdown cancelling this job must not lose the failure record.
            await asyncio.shield(self.on_failure(ctx, kwargs, message))
        except Exception:
            log.exception("could not record the failure of %s", self.name)


def job(
    *,
    name: str | None = None,
    timeout_cap_s: float | None = None,
    on_failure: FailureHook | None = None,
) -> Callable[[JobCoroutine], JobDefinition]:
    """Decorator: `@job(on_failure=...)` over `async def process_x(ctx: Ctx, ...)`."""

    def wrap(coroutine: JobCoroutine) -> JobDefinition:
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

    job: JobDefinition
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
            max_tries=settings.max_retries + 2,  # one beyond ours: see JobDefinition.run
            keep_result=settings.keep_result_s,
        )

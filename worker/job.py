"""How every job runs: log context, soft and hard time limits, the retry policy, failure records.

Jobs are plain coroutines `async def name(ctx: Ctx, **kwargs)`. `JobDefinition` wraps one for
arq, so every job gets the same behaviour without repeating it:

- logs carry the job id, name and try number;
- `ctx["soft_deadline"]` tells a long job when to checkpoint and continue in a fresh try;
- past the hard limit the job is stopped and recorded as failed. It is not retried: a job that
  ran that long will run that long again (imports avoid it with the soft limit);
- a transient failure becomes arq's `Retry` with exponential backoff, at most `MAX_RETRIES`
  times; a permanent one (or the last transient one) fails now, and `on_failure` records the
  reason on the job's own row (import, export, email) so users see it, not just Redis.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from arq.cron import CronJob, cron
from arq.typing import WorkerCoroutine
from arq.worker import Function, Retry

from worker.context import Ctx
from worker.errors import PermanentError, RateLimited, TransientError
from worker.logs import job_log_context
from worker.retry import classify, retry_delay_s
from worker.settings import Settings

log = logging.getLogger(__name__)

JobCoroutine = Callable[..., Awaitable[Any]]
FailureHook = Callable[[Ctx, dict[str, Any], str], Awaitable[None]]
# arq's own timeout stays a backstop behind ours, so our failure record gets written first.
ARQ_TIMEOUT_GRACE_S = 30.0


class HardTimeLimitExceeded(PermanentError):
    """The job ran past its hard time limit and was stopped."""


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
        job_try = ctx.get("job_try", 1)
        loop = asyncio.get_running_loop()
        hard_s = self.hard_timeout_s(settings)
        soft_s = min(settings.job_soft_timeout_s, hard_s * 0.9)
        ctx["soft_deadline"] = loop.time() + soft_s
        with job_log_context(job_id=ctx.get("job_id", "-"), job=self.name, job_try=job_try):
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
                if isinstance(failure, TransientError):
                    if job_try <= settings.max_retries:
                        wait_s = failure.retry_after_s if isinstance(failure, RateLimited) else None
                        defer_s = retry_delay_s(
                            job_try, settings.retry_base_delay_s, retry_after_s=wait_s
                        )
                        log.warning("transient failure, retry in %.1f s: %s", defer_s, failure)
                        raise Retry(defer=defer_s) from exc
                    failure = PermanentError(
                        f"gave up after {job_try} tries; last error: {failure}"
                    )
                log.error("job failed: %s", failure)
                await self._record_failure(ctx, kwargs, str(failure))
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
            max_tries=settings.max_retries + 1,
            keep_result=settings.keep_result_s,
        )

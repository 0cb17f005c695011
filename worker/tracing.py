"""OpenTelemetry traces when the optional extra `[otel]` is installed; nothing otherwise.

- `enqueue_span` (worker/routes.py): a PRODUCER span around each enqueue. Its W3C trace context
  rides in the job's JSON envelope (worker/serialization.py), never as a job keyword.
- `job_span` (worker/job.py): a CONSUMER span per try, named after the job function. The first
  try is a child of the enqueue span; a retry starts a trace of its own linked to it, so one
  enqueue's trace does not stretch across every backoff. SQL, HTTP and Redis spans of the
  installed instrumentations nest under it, since it is the current span while the job runs.
- `current_trace_ids` (worker/logs.py): the ids JSON log lines carry.

OpenTelemetry is imported on first use behind one check, `enabled()`: without it installed each
function here is a no-op and no `opentelemetry` module is ever loaded. With it installed but no
tracer provider configured (e.g. by `opentelemetry-instrument`), the API's spans record nothing
and no trace context is written into payloads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from arq.worker import Retry

from worker.serialization import received_trace_context, sending_trace_context

if TYPE_CHECKING:
    from arq.jobs import Job
    from opentelemetry.trace import Span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "contact360-worker"
# Messaging semantic conventions (https://opentelemetry.io/docs/specs/semconv/messaging/); the
# try number and outcome have no standard name, hence the system's and the project's own.
SYSTEM = "arq"
JOB_TRY = "messaging.arq.job_try"
ENQUEUE_REFUSED = "messaging.arq.duplicate_job_id"
OUTCOME = "c360.job.outcome"

EnqueueDone = Callable[["Job | None"], None]


@functools.cache
def enabled() -> bool:
    """Whether OpenTelemetry's API is installed: the one check before any use of it."""
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _propagator() -> TraceContextTextMapPropagator:
    # W3C trace context itself, not the global propagator: the envelope carries exactly
    # `traceparent` and `tracestate`, whatever else a host process propagates.
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def _ignore(job: Job | None) -> None:
    return None


@contextmanager
def enqueue_span(function: str, queue: str, job_id: str | None) -> Iterator[EnqueueDone]:
    """A PRODUCER span around one enqueue; payloads serialized within carry its context.

    Yields a callable to report what arq answered (the job, or None for a duplicate id).
    """
    if not enabled():
        yield _ignore
        return
    from opentelemetry import trace

    attributes: dict[str, str] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": "enqueue",
        "messaging.destination.name": queue,
    }
    if job_id is not None:
        attributes["messaging.message.id"] = job_id
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"enqueue {function}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    ) as span:

        def done(job: Job | None) -> None:
            if job is None:
                span.set_attribute(ENQUEUE_REFUSED, True)
            else:
                span.set_attribute("messaging.message.id", job.job_id)

        headers: dict[str, str] = {}
        _propagator().inject(headers)
        with sending_trace_context(headers):
            yield done


@contextmanager
def job_span(function: str, *, queue: str, job_id: str, job_try: int) -> Iterator[None]:
    """A CONSUMER span for one try of a job, current while the try runs."""
    if not enabled():
        yield
        return
    from opentelemetry import context, trace

    enqueued = _propagator().extract(received_trace_context() or {})
    enqueue_span_context = trace.get_current_span(enqueued).get_span_context()
    # The span's parent is only ever the enqueue span in the payload, never what happens to be
    # current in arq's task: a job without trace context (a cron tick, an older client) is a root.
    parent = context.Context()
    links: list[trace.Link] = []
    if enqueue_span_context.is_valid:
        if job_try == 1:
            parent = enqueued
        else:
            links.append(trace.Link(enqueue_span_context))
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        function,
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "run",
            "messaging.destination.name": queue,
            "messaging.message.id": job_id,
            JOB_TRY: job_try,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except Retry as exc:
            # Retry carries no message; what failed this try is its cause.
            _failed(span, exc.__cause__ or exc, "retried")
            raise
        except asyncio.CancelledError:
            # A shutdown: the job goes back to the queue, through no fault of its own.
            span.set_attribute(OUTCOME, "cancelled")
            raise
        except Exception as exc:
            _failed(span, exc, "failed")
            raise
        span.set_attribute(OUTCOME, "completed")


def _failed(span: Span, exc: BaseException, outcome: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute(OUTCOME, outcome)
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in W3C's hex form, or None outside any span."""
    if not enabled():
        return None
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")

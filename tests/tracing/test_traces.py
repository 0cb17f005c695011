"""Traces with the OpenTelemetry SDK: one trace from `JobsClient` through a burst worker's job to
its SQL; a retry linked to the enqueue, not its child; failures recorded; old payloads run."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import RunBurst
from tests.imports.conftest import start_import
from tests.tracing.fixture_jobs import BROKEN, ECHO, FLAKY, TRACE_JOBS
from worker.client import JobsClient
from worker.routes import enqueue
from worker.serialization import deserialize, serialize

ASYNCPG_SCOPE = "opentelemetry.instrumentation.asyncpg"


def only(spans: Iterable[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}"
    return found[0]


def job_try(span: ReadableSpan) -> int:
    """The try number a job span records (worker/tracing.py sets it on every try's span)."""
    value = span.attributes.get("messaging.arq.job_try") if span.attributes else None
    assert isinstance(value, int), span.name
    return value


def descends_from(
    span: ReadableSpan, ancestor: ReadableSpan, by_id: dict[int, ReadableSpan]
) -> bool:
    while span.parent is not None:
        if span.parent.span_id == ancestor.context.span_id:
            return True
        parent = by_id.get(span.parent.span_id)
        if parent is None:
            return False
        span = parent
    return False


async def test_one_trace_from_the_client_through_the_job_to_its_sql(
    spans: InMemorySpanExporter, jobs_client: JobsClient, run_burst: RunBurst, user_id: uuid.UUID
) -> None:
    # The web app's request that starts the import: the trace begins there.
    with trace.get_tracer("web-app").start_as_current_span("POST /imports") as request:
        import_id = await start_import(jobs_client, user_id, "email,first_name\nA@x.io,Ann\n")
    assert (await run_burst("imports")).jobs_complete == 1

    finished = spans.get_finished_spans()
    enqueued = only(finished, "enqueue process_contacts_import")
    ran = only(finished, "process_contacts_import")
    assert (enqueued.kind, ran.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert enqueued.parent is not None
    assert enqueued.parent.span_id == request.get_span_context().span_id
    assert ran.parent is not None and ran.parent.span_id == enqueued.context.span_id
    trace_id = request.get_span_context().trace_id
    assert enqueued.context.trace_id == ran.context.trace_id == trace_id
    job_id = f"import:{import_id}"
    for span in (enqueued, ran):
        assert span.attributes is not None
        assert span.attributes["messaging.system"] == "arq"
        assert span.attributes["messaging.destination.name"] == "imports"
        assert span.attributes["messaging.message.id"] == job_id
    assert ran.attributes is not None
    assert ran.attributes["messaging.arq.job_try"] == 1
    assert ran.attributes["c360.job.outcome"] == "completed"

    in_trace = [span for span in finished if span.context.trace_id == trace_id]
    by_id = {span.context.span_id: span for span in in_trace}
    job_sql = [
        span
        for span in in_trace
        if span.instrumentation_scope is not None
        and span.instrumentation_scope.name == ASYNCPG_SCOPE
        and descends_from(span, ran, by_id)
    ]
    # The import reads its row, merges a batch and records its result: several statements
    # under the job's span. Everything else in the trace is the request's (its own SQL too).
    assert len(job_sql) >= 3
    assert {span.name for span in in_trace if span.parent is None} == {"POST /imports"}


async def test_a_retried_try_is_linked_to_the_enqueue_not_its_child(
    spans: InMemorySpanExporter, arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    job = await enqueue(arq_redis, FLAKY, None, key="k1")
    assert job is not None
    worker = await run_burst("default", jobs=TRACE_JOBS)
    assert (worker.jobs_complete, worker.jobs_retried, worker.jobs_failed) == (1, 1, 0)

    finished = spans.get_finished_spans()
    enqueued = only(finished, f"enqueue {FLAKY.name}")
    assert enqueued.attributes is not None
    assert enqueued.attributes["messaging.message.id"] == job.job_id
    first, second = sorted(
        (span for span in finished if span.name == FLAKY.name),
        key=job_try,
    )
    assert first.parent is not None and first.parent.span_id == enqueued.context.span_id
    assert not first.links
    assert first.status.status_code == StatusCode.ERROR
    assert first.attributes is not None and first.attributes["c360.job.outcome"] == "retried"
    # What failed the try is recorded (Retry itself says nothing).
    (event,) = first.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "httpx.ConnectError"
    assert "provider unreachable for k1" in str(event.attributes["exception.message"])

    assert second.parent is None
    assert second.context.trace_id != enqueued.context.trace_id
    assert [link.context.span_id for link in second.links] == [enqueued.context.span_id]
    assert [link.context.trace_id for link in second.links] == [enqueued.context.trace_id]
    assert second.status.status_code == StatusCode.UNSET
    assert second.attributes is not None and second.attributes["c360.job.outcome"] == "completed"


async def test_a_failed_job_records_its_exception_and_an_error_status(
    spans: InMemorySpanExporter, arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    await enqueue(arq_redis, BROKEN, None, key="k2")
    worker = await run_burst("default", jobs=TRACE_JOBS)
    assert (worker.jobs_complete, worker.jobs_failed) == (0, 1)

    ran = only(spans.get_finished_spans(), BROKEN.name)
    assert ran.status.status_code == StatusCode.ERROR
    assert ran.status.description is not None and "no such thing as k2" in ran.status.description
    assert ran.attributes is not None and ran.attributes["c360.job.outcome"] == "failed"
    assert [event.name for event in ran.events] == ["exception"]


async def test_payloads_without_trace_context_or_with_a_foreign_one_still_run(
    spans: InMemorySpanExporter, arq_redis: ArqRedis, run_burst: RunBurst
) -> None:
    # As an older client enqueued: arq's own call, no producer span, no trace field.
    plain = await arq_redis.enqueue_job(ECHO.name, key="old", _queue_name=ECHO.queue)
    assert plain is not None
    raw = await arq_redis.get(job_key_prefix + plain.job_id)
    assert raw is not None and b'"trace"' not in raw
    # A trace field someone else wrote: not ours to trust, and no reason to fail the job.
    foreign = await arq_redis.enqueue_job(ECHO.name, key="foreign", _queue_name=ECHO.queue)
    assert foreign is not None
    key = job_key_prefix + foreign.job_id
    envelope = deserialize(await arq_redis.get(key))
    await arq_redis.set(key, serialize({**envelope, "trace": {"traceparent": ["not", "text"]}}))

    worker = await run_burst("default", jobs=TRACE_JOBS)
    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)
    ran = [span for span in spans.get_finished_spans() if span.name == ECHO.name]
    assert len(ran) == 2
    assert all(span.parent is None and not span.links for span in ran)
    assert [await plain.result(timeout=1), await foreign.result(timeout=1)] == ["old", "foreign"]

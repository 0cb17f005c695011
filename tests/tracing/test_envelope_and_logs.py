"""The trace context's field in the JSON envelope, and the trace id in JSON log lines."""

from __future__ import annotations

import json
import logging

from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker.logs import JsonFormatter
from worker.serialization import (
    deserialize,
    received_trace_context,
    sending_trace_context,
    serialize,
)
from worker.tracing import TRACER_NAME

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
JOB = {"t": 1, "f": "send_email", "a": [], "k": {"email_id": "e1"}, "et": 1700000000000}


def test_the_trace_context_rides_in_the_envelope_and_leaves_the_job_as_it_was() -> None:
    plain = serialize(JOB)
    with sending_trace_context({"traceparent": TRACEPARENT, "tracestate": "c360=1"}):
        traced = serialize(JOB)
        result = serialize(["a result", 1])
    assert json.loads(traced) == {
        **JOB,
        "trace": {"traceparent": TRACEPARENT, "tracestate": "c360=1"},
    }
    assert result == serialize(["a result", 1])
    assert deserialize(traced) == JOB
    assert received_trace_context() == {"traceparent": TRACEPARENT, "tracestate": "c360=1"}
    # Outside the block, and for a payload without the field, nothing is added or left over.
    assert serialize(JOB) == plain
    assert deserialize(plain) == JOB
    assert received_trace_context() is None


def test_a_trace_field_someone_else_wrote_is_reduced_to_the_w3c_headers_or_dropped() -> None:
    def received(trace_field: object) -> dict[str, str] | None:
        assert deserialize(json.dumps({**JOB, "trace": trace_field}).encode()) == JOB
        return received_trace_context()

    assert received({"traceparent": TRACEPARENT, "baggage": "user=x", "x": 1}) == {
        "traceparent": TRACEPARENT
    }
    assert received({"traceparent": TRACEPARENT, "tracestate": "k=" + "v" * 600}) == {
        "traceparent": TRACEPARENT
    }
    assert received({"tracestate": "k=v"}) is None
    assert received({"traceparent": 7}) is None
    assert received("00-abc") is None


def test_json_log_lines_carry_the_current_trace_and_span_ids(
    spans: InMemorySpanExporter,
) -> None:
    formatter = JsonFormatter()

    def line() -> dict[str, object]:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
        parsed: dict[str, object] = json.loads(formatter.format(record))
        return parsed

    assert "trace_id" not in line()
    with trace.get_tracer(TRACER_NAME).start_as_current_span("a job") as span:
        inside = line()
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert "trace_id" not in line()

"""JSON (never pickle) for arq jobs and results, gzip-compressed above a size threshold.

arq's default serializer is pickle: anyone who can write to Redis could make a worker execute
code. We refuse every payload that is not our JSON, so a pickle or garbage bytes in a queue
fail that one job with a readable error and the worker goes on serving the others.

Wire format: a JSON object, or that JSON gzip-compressed (detected by the gzip magic bytes).
Values JSON cannot carry travel as one-key objects: `{"$dt": iso}`, `{"$uuid": ...}`,
`{"$exc": {"type": ..., "message": ...}}` (failed jobs' results, readable by any tool).

A job's envelope may also carry the enqueuer's W3C trace context as a top-level field `trace`
(`{"traceparent": ..., "tracestate": ...}`, set by `worker/tracing.py`), beside arq's own keys and
never among the job's keywords. `deserialize` takes it out again and leaves it in a context
variable: arq's `Worker.run_job` calls the deserializer in the task that then creates the job's
task, which starts with a copy of that context, so the job wrapper reads the value of its own
job. A payload without the field (an older client, a cron tick) runs as before.
"""

from __future__ import annotations

import contextvars
import gzip
import json
import uuid
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any

COMPRESS_ABOVE_BYTES = 1024
# A gzip bomb or a huge raw payload must not take the worker's memory: real payloads are ids
# and short texts. The cap holds for the JSON text, compressed or not, at both ends.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"

TRACE_FIELD = "trace"
TRACE_HEADERS = ("traceparent", "tracestate")
# W3C Trace Context: a traceparent is 55 characters; a tracestate may be cut beyond 512.
MAX_TRACE_HEADER_CHARS = 512
_sending_trace: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "sending_trace", default=None
)
_received_trace: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "received_trace", default=None
)


class PayloadRefused(ValueError):
    """The bytes are not a payload this project wrote; they are never executed."""


class RemoteJobError(Exception):
    """A failed job's exception, rebuilt from its JSON form on the reading side."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message


def exception_to_json(exc: BaseException) -> dict[str, str]:
    """Type and message of an exception, with its cause when it has no message of its own."""
    if isinstance(exc, RemoteJobError):
        return {"type": exc.type_name, "message": exc.message}
    cls = type(exc)
    type_name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    message = str(exc)
    if exc.__cause__ is not None:
        message = f"{message}: {exc.__cause__}" if message else str(exc.__cause__)
    return {"type": type_name, "message": message}


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    if isinstance(value, BaseException):
        return {"$exc": exception_to_json(value)}
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} values cannot be sent as job arguments or results")


def _decode_object(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((key, value),) = obj.items()
        if key == "$dt":
            return datetime.fromisoformat(value)
        if key == "$date":
            return date.fromisoformat(value)
        if key == "$uuid":
            return uuid.UUID(value)
        if key == "$exc":
            return RemoteJobError(value["type"], value["message"])
    return obj


@contextmanager
def sending_trace_context(headers: Mapping[str, str]) -> Iterator[None]:
    """Payloads serialized within carry `headers` (W3C trace context) in their envelope."""
    token = _sending_trace.set(_trace_headers(headers))
    try:
        yield
    finally:
        _sending_trace.reset(token)


def received_trace_context() -> dict[str, str] | None:
    """The trace context of the payload this task deserialized last, if it carried one."""
    return _received_trace.get()


def _trace_headers(value: Any) -> dict[str, str] | None:
    """The W3C headers in `value`; anything else (written by someone else) is dropped."""
    if not isinstance(value, Mapping):
        return None
    headers = {
        name: value[name]
        for name in TRACE_HEADERS
        if isinstance(value.get(name), str) and len(value[name]) <= MAX_TRACE_HEADER_CHARS
    }
    return headers if "traceparent" in headers else None


def serialize(data: Any) -> bytes:
    """Encode a job or result for Redis; large payloads are gzip-compressed."""
    trace = _sending_trace.get()
    if trace is not None and isinstance(data, dict):
        data = {**data, TRACE_FIELD: trace}
    raw = json.dumps(data, default=_encode_value, separators=(",", ":"), ensure_ascii=False)
    encoded = raw.encode()
    if len(encoded) > MAX_PAYLOAD_BYTES:
        # Refused here, where the caller sees it, rather than by the worker that would get it.
        raise ValueError(
            f"payload of {len(encoded)} bytes is larger than {MAX_PAYLOAD_BYTES} bytes; "
            "pass ids and short texts, and keep bulk data in PostgreSQL or S3"
        )
    if len(encoded) > COMPRESS_ABOVE_BYTES:
        return gzip.compress(encoded, compresslevel=5, mtime=0)
    return encoded


def _gunzip_bounded(payload: bytes) -> bytes:
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        data = decompressor.decompress(payload, MAX_PAYLOAD_BYTES + 1)
    except zlib.error as exc:
        raise PayloadRefused(f"corrupt gzip payload ({exc})") from None
    if len(data) > MAX_PAYLOAD_BYTES or decompressor.unconsumed_tail:
        raise PayloadRefused(f"payload larger than {MAX_PAYLOAD_BYTES} bytes once decompressed")
    return data


def _describe(payload: bytes) -> str:
    if payload[:1] == b"\x80":
        return "it looks like a Python pickle"
    return f"it starts with {payload[:8]!r}"


def deserialize(payload: bytes) -> Any:
    """Decode what `serialize` wrote; anything else raises `PayloadRefused`."""
    # Checked before any parsing, gzip or not: json.loads of a huge payload costs its size many
    # times over in memory. (Gzip of JSON text is always smaller than the text `serialize` caps.)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadRefused(
            f"payload of {len(payload)} bytes is larger than {MAX_PAYLOAD_BYTES}; refusing it"
        )
    if payload[:2] == GZIP_MAGIC:
        payload = _gunzip_bounded(payload)
    if payload[:1] != b"{":
        raise PayloadRefused(f"not a JSON job payload ({_describe(payload)}); refusing it")
    try:
        data = json.loads(payload, object_hook=_decode_object)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadRefused(f"not a valid JSON job payload ({exc}); refusing it") from None
    trace = data.pop(TRACE_FIELD, None) if isinstance(data, dict) else None
    _received_trace.set(_trace_headers(trace))
    return data

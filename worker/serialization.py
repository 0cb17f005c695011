"""JSON (never pickle) for arq jobs and results, gzip-compressed above a size threshold.

arq's default serializer is pickle: anyone who can write to Redis could make a worker execute
code. We refuse every payload that is not our JSON, so a pickle or garbage bytes in a queue
fail that one job with a readable error and the worker goes on serving the others.

Wire format: a JSON object, or that JSON gzip-compressed (detected by the gzip magic bytes).
Values JSON cannot carry travel as one-key objects: `{"$dt": iso}`, `{"$uuid": ...}`,
`{"$exc": {"type": ..., "message": ...}}` (failed jobs' results, readable by any tool).
"""

from __future__ import annotations

import gzip
import json
import uuid
import zlib
from datetime import date, datetime
from typing import Any

COMPRESS_ABOVE_BYTES = 1024
# A gzip bomb or a huge raw payload must not take the worker's memory: real payloads are ids
# and short texts. The cap holds for the JSON text, compressed or not, at both ends.
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
GZIP_MAGIC = b"\x1f\x8b"


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


def serialize(data: Any) -> bytes:
    """Encode a job or result for Redis; large payloads are gzip-compressed."""
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
        return json.loads(payload, object_hook=_decode_object)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadRefused(f"not a valid JSON job payload ({exc}); refusing it") from None

"""Structured logs: every line a job writes carries its job id, job name and try number.

JSON lines also carry the current span's `trace_id` and `span_id` when OpenTelemetry traces
(worker/tracing.py), so a log line leads to its trace and back.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from worker.tracing import current_trace_ids

# asyncio copies context variables into each task, so each running job sees its own values.
_job_fields: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("job_fields")


@contextmanager
def job_log_context(**fields: Any) -> Iterator[None]:
    token = _job_fields.set(fields)
    try:
        yield
    finally:
        _job_fields.reset(token)


class _JobFieldsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        fields = _job_fields.get({})
        record.job_fields = " ".join(f"{k}={v}" for k, v in fields.items())
        record.job = fields
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "job", {}),
        }
        trace_ids = current_trace_ids()
        if trace_ids is not None:
            entry["trace_id"], entry["span_id"] = trace_ids
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_JobFieldsFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s %(job_fields)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; keep provider traffic out of the operators' view.
    logging.getLogger("httpx").setLevel(logging.WARNING)

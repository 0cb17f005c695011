"""Server-sent events for one import's progress (`GET /api/imports/{id}/events`).

The console keeps no event stream in memory: each open stream reads the import's row from
PostgreSQL every `POLL_S` and sends it (the `/api/imports/{id}` answer, as `data:`) when it
changed. When the import has ended it sends that last state, then an `end` event, and closes:
the page's EventSource closes on `end` rather than reconnecting. A client that goes away stops
its stream (Starlette cancels the generator on `http.disconnect`; the loop also checks).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from db.models import ENDED_IMPORT_STATUSES
from worker.web import reads

POLL_S = 1.0
# A comment line now and then keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
# The browser's wait before reconnecting after a dropped connection.
RETRY_MS = 3000


def _event(data: str, name: str | None = None) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data}\n\n"


async def _stream(
    request: Request, sessions: reads.Sessions, import_id: uuid.UUID
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    sent: str | None = None
    quiet_s = 0.0
    while not await request.is_disconnected():
        detail = await reads.import_detail(sessions, import_id)
        if detail is None:  # the row was deleted under us
            yield _event("{}", "end")
            return
        # Rows/s and the ETA move with the clock; an event is worth sending when the row did.
        row = {k: v for k, v in detail.items() if k not in ("rows_per_s", "eta_s")}
        if (current := json.dumps(row, sort_keys=True)) != sent:
            sent, quiet_s = current, 0.0
            yield _event(json.dumps(detail))
        elif quiet_s >= KEEPALIVE_S:
            quiet_s = 0.0
            yield ": keepalive\n\n"
        if detail["status"] in ENDED_IMPORT_STATUSES:
            yield _event("{}", "end")
            return
        await asyncio.sleep(POLL_S)
        quiet_s += POLL_S


def import_events(
    request: Request, sessions: reads.Sessions, import_id: uuid.UUID
) -> StreamingResponse:
    return StreamingResponse(
        _stream(request, sessions, import_id),
        media_type="text/event-stream",
        # No buffering by nginx-like proxies, so each event arrives when it is sent.
        headers={"x-accel-buffering": "no"},
    )

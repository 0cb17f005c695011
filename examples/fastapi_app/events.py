"""Server-sent events for one import's progress: one event per change, closed when it ends.

Each stream reads the import's status from PostgreSQL every `poll_s` (the app holds no
progress in memory, so any number of app processes can serve streams) and sends it as `data:`
when it differs from the last one sent. When the import has ended it sends an `end` event and
closes, so a browser's EventSource stops instead of reconnecting. Starlette cancels the
generator when the client disconnects.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from db.models import ENDED_IMPORT_STATUSES
from worker.client import JobsClient

DEFAULT_POLL_S = 0.5
# A comment line now and then keeps proxies from closing a quiet stream.
KEEPALIVE_S = 15.0
# The browser's wait before it reconnects after a dropped connection.
RETRY_MS = 3000
END_EVENT = "event: end\ndata: {}\n\n"


async def import_events(
    jobs: JobsClient, import_id: uuid.UUID, user_id: uuid.UUID, poll_s: float
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    sent: str | None = None
    quiet_s = 0.0
    while True:
        try:
            progress = await jobs.import_status(import_id, user_id=user_id)
        except LookupError:  # deleted while we watched
            yield END_EVENT
            return
        if (current := progress.model_dump_json()) != sent:
            sent, quiet_s = current, 0.0
            yield f"data: {current}\n\n"
        elif quiet_s >= KEEPALIVE_S:
            quiet_s = 0.0
            yield ": keepalive\n\n"
        if progress.status in ENDED_IMPORT_STATUSES:
            yield END_EVENT
            return
        await asyncio.sleep(poll_s)
        quiet_s += poll_s

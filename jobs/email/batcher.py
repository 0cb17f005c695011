"""The per-process coalescer in front of the email provider: many `deliver`s, few requests.

`outbox.deliver` hands its draft to `ctx["email_batcher"]` and awaits its own `Outcome`. The
batcher collects drafts from concurrent coroutines (a campaign page's 200 sends, a burst of
`send_email` jobs on the default queue) into a group: the group waits `BATCH_LINGER_S` for
company (no wait once it holds as many as one request carries), then for one send slot of the
shared rate limiter, still taking drafts meanwhile, and then goes out as one flush
(jobs/email/flush.py: one claim transaction, one request, one settle transaction). A lone
email leaves after the linger, well within a second when the limiter has room.

The flush runs in a task the batcher owns: a caller cancelled (its job timed out) stops waiting
but never cancels a batch in flight, whose other members' callers still wait for it. `aclose`
(lifecycle.shutdown) lets the flushes in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from jobs.email.flush import Submission, flush
from worker.context import Ctx
from worker.email_providers import EmailProvider
from worker.email_providers.base import batch_capacity
from worker.errors import TransientError

log = logging.getLogger(__name__)

# Long enough for the concurrent sends of a page or a burst to meet, short enough that a lone
# transactional email is not noticeably late.
BATCH_LINGER_S = 0.04
# A 429 may pause every sender for up to 300 s (worker.email_providers.base): wait through it
# rather than burn a retry, but give up before the job's own time limit (SEND_JOB_CAP_S).
ACQUIRE_TIMEOUT_S = 400.0
# Shutdown waits this long for flushes in flight (a provider exchange takes at most ~20 s).
CLOSE_TIMEOUT_S = 30.0


@dataclass(eq=False)
class _Group:
    ctx: Ctx
    provider: EmailProvider
    capacity: int
    submissions: list[Submission] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    full: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def takes(self, key: str) -> bool:
        return not self.closed and len(self.submissions) < self.capacity and key not in self.keys

    def add(self, submission: Submission) -> None:
        self.submissions.append(submission)
        self.keys.add(submission.draft.key)
        if len(self.submissions) >= self.capacity:
            self.full.set()


class EmailBatcher:
    """Coalesces `deliver` calls of this process into provider batches."""

    def __init__(self, worker: str, *, linger_s: float = BATCH_LINGER_S) -> None:
        self.worker = worker
        self.linger_s = linger_s
        # Batches this process is sending now: a claim of theirs is live, not crashed.
        self.in_flight: set[uuid.UUID] = set()
        self._open: dict[tuple[int, ...], _Group] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def __repr__(self) -> str:
        return f"EmailBatcher(worker={self.worker!r}, in_flight={len(self.in_flight)})"

    async def submit(self, ctx: Ctx, provider: EmailProvider, submission: Submission) -> Any:
        """Queue `submission` and wait for its result (an `Outcome`, or its error raised)."""
        if self._closing:
            raise TransientError("this worker is shutting down; the email is sent on a retry")
        # One group per set of resources: a test (or a tool) may swap a ctx's provider.
        resources = (id(provider), id(ctx["sessions"]), id(ctx["email_rate_limiter"]))
        group = self._open.get(resources)
        if group is None or not group.takes(submission.draft.key):
            group = _Group(ctx, provider, batch_capacity(provider))
            self._open[resources] = group
            task = asyncio.create_task(self._run(resources, group), name="c360-email-batch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        group.add(submission)
        # shield: a cancelled caller stops waiting; its batch goes on for the others.
        return await asyncio.shield(submission.future)

    async def _run(self, resources: tuple[int, ...], group: _Group) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.full.wait(), self.linger_s)
            limiter = group.ctx["email_rate_limiter"]
            try:
                # Before the claim: waiting for a slot must not age a claim towards its lease.
                # The group keeps taking drafts while it waits: the slot carries them all.
                await limiter.acquire(timeout_s=ACQUIRE_TIMEOUT_S)
            except TimeoutError:
                raise TransientError(f"no send slot within {ACQUIRE_TIMEOUT_S:g} s") from None
            finally:
                group.closed = True
                if self._open.get(resources) is group:
                    del self._open[resources]
            await flush(group.ctx, group.provider, group.submissions, self)
        except BaseException as exc:
            for submission in group.submissions:
                submission.resolve(exc)
            if not isinstance(exc, Exception):
                raise

    async def aclose(self) -> None:
        """Let the flushes in flight finish (bounded); new submissions are refused."""
        self._closing = True
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_TIMEOUT_S)
        for task in pending:
            log.warning("email batch still in flight at shutdown: cancelled; a retry resends it")
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

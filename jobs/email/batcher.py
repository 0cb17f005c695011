"""The per-process coalescer in front of the email provider: many `deliver`s, few requests.

`outbox.deliver` hands its draft to `ctx["email_batcher"]` and awaits its own `Outcome`. The
batcher collects drafts from concurrent coroutines (a campaign page's 200 sends, a burst of
`send_email` jobs on the default queue) into a group: the group waits `BATCH_LINGER_S` for
company (no wait once it holds as many as one request carries), then until the shared rate
limiter's next slot is about free (less the time a claim takes), still taking drafts
meanwhile, and then goes out as one flush (jobs/email/flush.py: one claim transaction, the
slot taken, one request, one settle transaction). A lone email leaves after the linger, well
within a second when the limiter has room.

A flush with room fills its request with due `pending` one-off rows nobody holds (the sweep,
jobs/email/claims.py), and starts another flush for the next slot while the sweep keeps finding
rows: a burst drains at the provider's rate however few of its jobs arq runs at once. Those
jobs then find their rows settled before joining a group (no linger, no slot) and return
`duplicate`, or wait for the batch that carries theirs.

The flush runs in a task the batcher owns: a caller cancelled (its job timed out) stops waiting
but never cancels a batch in flight, whose other members' callers still wait for it. `aclose`
(lifecycle.shutdown) lets the flushes in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

from jobs.email import claims
from jobs.email.claims import Unit, Verdict
from jobs.email.exchange import SLOT_WAIT_S
from jobs.email.flush import Submission, flush
from jobs.email.outbox import Outcome, Status
from worker.context import Ctx
from worker.email_providers import EmailProvider
from worker.email_providers.base import batch_capacity
from worker.errors import ProviderFault, TransientError
from worker.ratelimit import MAX_SLEEP_S, RateLimiter

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
        # One-off rows a flush of this process swept into its batch: their own jobs, arriving
        # meanwhile, wait for that answer (None: not settled, they go the usual way).
        self.swept: dict[str, asyncio.Future[Outcome | None]] = {}
        self._swept_by_batch: dict[uuid.UUID, list[str]] = {}
        self._open: dict[tuple[int, ...], _Group] = {}
        # Keys submitted whose flush has not finished: a sweep leaves them to their own.
        self._queued: Counter[str] = Counter()
        # Per set of resources: groups closed that have not taken their send slot yet.
        self._ahead: Counter[tuple[int, ...]] = Counter()
        # How long a claim takes (smoothed): a group closes that much before its slot is free.
        self._claim_s = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def __repr__(self) -> str:
        return f"EmailBatcher(worker={self.worker!r}, in_flight={len(self.in_flight)})"

    async def submit(self, ctx: Ctx, provider: EmailProvider, submission: Submission) -> Any:
        """Queue `submission` and wait for its result (an `Outcome`, or its error raised)."""
        if self._closing:
            raise TransientError("this worker is shutting down; the email is sent on a retry")
        if submission.after is None and (early := await self.settled(ctx, submission.draft.key)):
            return early
        # One group per set of resources: a test (or a tool) may swap a ctx's provider.
        resources = (id(provider), id(ctx["sessions"]), id(ctx["email_rate_limiter"]))
        group = self._open.get(resources)
        if group is None or not group.takes(submission.draft.key):
            group = self._start(ctx, provider, resources)
        group.add(submission)
        self._queued[submission.draft.key] += 1
        # shield: a cancelled caller stops waiting; its batch goes on for the others.
        return await asyncio.shield(submission.future)

    async def settled(self, ctx: Ctx, key: str) -> Outcome | None:
        """A row already settled (a sweep sent it, or a repeat): its outcome at once, without a
        linger or a send slot; None: claim it as usual. Only for drafts without an `after`
        hook (which must run in a claim's transaction): the one-off emails a sweep takes."""
        if key not in self.swept:
            async with ctx["sessions"]() as session:
                row = await claims.read_row(session, key)
            if row is not None and row.status in claims.SETTLED:
                status = cast(Status, row.status)
                return Outcome(key, status, False, row.provider_message_id, row.last_error)
            if key not in self.swept:  # not taken by a sweep of this process meanwhile
                return None
        return await asyncio.shield(self.swept[key])

    def _start(self, ctx: Ctx, provider: EmailProvider, resources: tuple[int, ...]) -> _Group:
        group = _Group(ctx, provider, batch_capacity(provider))
        self._open[resources] = group
        task = asyncio.create_task(self._run(resources, group), name="c360-email-batch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return group

    def sweep_more(self, ctx: Ctx, provider: EmailProvider) -> None:
        """A sweep found rows: more may be due, so another flush goes for them at the next
        slot without waiting for their jobs (a burst drains at the provider's rate, not at
        arq's; the jobs, behind, find their rows settled). The first sweep that finds
        nothing ends it, at the cost of one query."""
        resources = (id(provider), id(ctx["sessions"]), id(ctx["email_rate_limiter"]))
        if not self._closing and resources not in self._open:
            self._start(ctx, provider, resources)

    def queued_keys(self) -> list[str]:
        return list(self._queued)

    def note_swept(self, batch_id: uuid.UUID, keys: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for key in keys:
            self.swept[key] = loop.create_future()
        self._swept_by_batch[batch_id] = keys

    def settle_swept(
        self, batch_id: uuid.UUID, units: list[Unit], verdicts: dict[uuid.UUID, Verdict]
    ) -> None:
        """Answer the jobs waiting on the members batch `batch_id` swept (also after a failure:
        a member with no settled verdict is left to its own job, which claims it as usual)."""
        ids = {m.key: m.id for unit in units for m in unit.members}
        for key in self._swept_by_batch.pop(batch_id, []):
            future = self.swept.pop(key)
            verdict = verdicts.get(ids[key]) if key in ids else None
            outcome = None
            if verdict is not None and verdict.status in claims.SETTLED:
                status = cast(Status, verdict.status)
                outcome = Outcome(key, status, False, verdict.message_id, verdict.error)
            future.set_result(outcome)

    async def _run(self, resources: tuple[int, ...], group: _Group) -> None:
        ahead = False
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(group.full.wait(), self.linger_s)
            limiter = group.ctx["email_rate_limiter"]
            try:
                # The group keeps taking drafts until its slot is about free: the slot carries
                # them all. Nothing is claimed yet, so a long wait (a 429 pause) ages no claim.
                await self._wait_turn(resources, limiter)
            except TimeoutError:
                raise TransientError(f"no send slot within {ACQUIRE_TIMEOUT_S:g} s") from None
            finally:
                group.closed = True
                if self._open.get(resources) is group:
                    del self._open[resources]
            self._ahead[resources] += 1
            ahead, closed_at = True, time.monotonic()

            async def take_slot() -> None:
                nonlocal ahead
                claim_s = time.monotonic() - closed_at
                self._claim_s = min(0.8 * self._claim_s + 0.2 * claim_s, limiter.interval_s)
                try:
                    await limiter.acquire(timeout_s=SLOT_WAIT_S)
                finally:
                    self._ahead[resources] -= 1
                    ahead = False

            await flush(
                group.ctx,
                group.provider,
                group.submissions,
                self,
                capacity=group.capacity,
                take_slot=take_slot,
            )
        except BaseException as exc:
            for submission in group.submissions:
                submission.resolve(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if ahead:
                self._ahead[resources] -= 1
            self._queued -= Counter(s.draft.key for s in group.submissions)

    async def _wait_turn(self, resources: tuple[int, ...], limiter: RateLimiter) -> None:
        """Wait until this group's slot is free, less the time its claim takes (its turn comes
        after the groups of this process closed before it); `ProviderFault` while halted."""
        deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
        while True:
            free_in_s = await limiter.free_in_s()
            wait_s = free_in_s + self._ahead[resources] * limiter.interval_s - self._claim_s
            if wait_s <= 0:
                return
            if free_in_s > 0 and (reason := await limiter.halted()) is not None:
                raise ProviderFault(f"sending is halted: {reason}", free_in_s)
            if time.monotonic() + wait_s > deadline:
                raise TimeoutError
            await asyncio.sleep(min(wait_s, MAX_SLEEP_S))

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

"""A flush's provider side: its send slots, its requests, and what a whole answer does to
every sender (jobs/email/flush.py claims before and settles after).

A request leaves when its limiter slot says: the slot is taken after the claim commits
(`take_slots`), with a bounded wait; claims that get none in time are given back (`release`),
nothing sent and nothing counted.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from jobs.email import claims
from jobs.email.claims import Unit, Verdict
from worker.context import Ctx
from worker.email_providers import EmailProvider, OutgoingEmail
from worker.email_providers.base import BatchEmailProvider, MemberAnswer
from worker.errors import PermanentError, ProviderFault, RateLimited, TransientError

if TYPE_CHECKING:
    from jobs.email.flush import Submission

log = logging.getLogger(__name__)

# A 429 asking for at most RATE_LIMITED_WAIT_S is waited out inside the flush, up to this many
# times, before the members go back to `pending` for their callers' retries.
RATE_LIMITED_RETRIES = 2
RATE_LIMITED_WAIT_S = 5.0
# How long claimed members may wait for their send slot: a few grants' worth when processes
# share the limiter, far below SEND_LEASE_S. Past it they are released, nothing counted.
SLOT_WAIT_S = 10.0


async def take_slots(
    ctx: Ctx, units: list[Unit], take_slot: Callable[[], Awaitable[None]]
) -> list[Unit]:
    """The units that got their send slot, in order; the first waits on `take_slot`."""
    limiter = ctx["email_rate_limiter"]
    slotted: list[Unit] = []
    for unit in units:
        try:
            if slotted:  # a batch taken over besides the new one: a request of its own
                await limiter.acquire(timeout_s=SLOT_WAIT_S)
            else:
                await take_slot()
        except (TimeoutError, ProviderFault) as exc:
            for later in units[len(slotted) :]:
                later.refused = exc
            break
        slotted.append(unit)
    return slotted


async def release(
    ctx: Ctx, units: Sequence[Unit], waiting: dict[uuid.UUID, Submission], worker: str
) -> None:
    """Give back claims that never got a send slot: nothing was sent, no attempt counts.

    A new composition goes back to `pending`; a batch taken over stays `sending`, released
    (no claimer), so the next claim resends it under its key at once, as after a timeout.
    """
    verdicts: dict[uuid.UUID, Verdict] = {}
    results: dict[uuid.UUID, BaseException] = {}
    for unit in units:
        exc = unit.refused or TransientError("no send slot")
        if isinstance(exc, TimeoutError):
            exc = TransientError(f"no send slot within {SLOT_WAIT_S:g} s after the claim")
        for member in unit.members:
            if member.id in unit.held:
                status = "pending" if unit.fresh else "sending"
                verdicts[member.id] = Verdict(status, str(exc), delta=-1)
                results[member.id] = exc
    async with ctx["sessions"].begin() as session:
        await claims.settle(session, verdicts, worker=worker)
    for member_id, exc in results.items():
        if member_id in waiting:
            waiting[member_id].resolve(exc)


async def send(
    ctx: Ctx, provider: EmailProvider, unit: Unit, sender: str
) -> list[MemberAnswer] | BaseException:
    """`_exchange`, asked again after a short 429: the provider refused the whole request, so
    the same request is safe to repeat, and a batch of 100 is not left for a later tick over
    a limiter's jitter. A longer wait is left to the callers' retries (rows back to `pending`)."""
    limiter = ctx["email_rate_limiter"]
    for _ in range(RATE_LIMITED_RETRIES):
        answer = await _exchange(provider, unit, sender)
        if not isinstance(answer, RateLimited) or answer.retry_after_s > RATE_LIMITED_WAIT_S:
            return answer
        # Every process waits, not just this one: the provider's limit is per account.
        await limiter.pause_for(answer.retry_after_s)
        try:
            await limiter.acquire(timeout_s=RATE_LIMITED_WAIT_S * 2)
        except (TimeoutError, ProviderFault):
            return answer
    return await _exchange(provider, unit, sender)


async def _exchange(
    provider: EmailProvider, unit: Unit, sender: str
) -> list[MemberAnswer] | BaseException:
    """One request for `unit`: an answer per member, or the whole request's failure."""
    emails = [
        OutgoingEmail(sender, (m.to,), m.subject, m.html, m.text, m.headers) for m in unit.members
    ]
    try:
        if len(emails) == 1:
            return [await provider.send(emails[0], unit.key)]
        assert isinstance(provider, BatchEmailProvider)  # only those get batches of more
        return await provider.send_batch(emails, unit.key)
    except (PermanentError, TransientError) as exc:
        return exc


async def pause_or_halt(ctx: Ctx, answers: list[list[MemberAnswer] | BaseException]) -> None:
    limiter = ctx["email_rate_limiter"]
    for answer in answers:
        if isinstance(answer, RateLimited):
            # Every process waits, not just this one: the provider's limit is per account.
            await limiter.pause_for(answer.retry_after_s)
        elif isinstance(answer, ProviderFault) and await limiter.halt(
            answer.retry_after_s, str(answer)
        ):
            # Once per halt, cluster-wide. The text is the provider's (API key redacted).
            log.error(
                "email provider refused the account, not the message: %s. Sending is halted on "
                "every worker for %g s and due emails stay pending; check EMAIL_API_KEY and "
                "that EMAIL_FROM's domain is verified with the provider",
                answer,
                answer.retry_after_s,
            )

"""One flush of the batcher: claim every draft in one transaction, send each batch in one
request, settle every member in one transaction, then answer each caller.

What an answer does to a batch's members (the outbox diagram, jobs/email/outbox.py):

- an id: `sent`; a member the provider refused alone (Resend's permissive `errors`): `failed`;
- a whole-batch 4xx: every member `failed` with the provider's message;
- 429: every member back to `pending` with its attempt given back (the limiter's fault, not
  the message's), and every process paused; 401/403/`invalid_from_address`: the same, plus the
  halt (`ProviderFault`);
- a failure that may follow an acceptance (timeout, dropped connection, Resend 5xx): the members
  stay `sending` in their batch with no live claimer, so the next claim of any of them resends
  the same batch under the same key at once; SendGrid (no deduplication): `review`;
- a failure that proves nothing was sent (connection refused, SendGrid 5xx): `pending`.

A batch that was already requested once (taken over after a crash or a timeout) never goes
back to `pending`: only its own composition under its own key may be sent again.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from jobs.email import claims
from jobs.email.claims import Found, Member, NewMessage, Unit, Verdict
from jobs.email.exchange import SLOT_WAIT_S as SLOT_WAIT_S
from jobs.email.exchange import pause_or_halt, release, send, take_slots
from jobs.email.outbox import AfterSettled, Draft, ManyHook, Outcome, Status
from worker import process_info
from worker.context import Ctx
from worker.email_providers import DeliveryUnknown, EmailProvider, safe_to_resend
from worker.email_providers.base import MemberAnswer
from worker.errors import PermanentError, ProviderFault, RateLimited, TransientError
from worker.lease import LEASE_MS

if TYPE_CHECKING:
    from jobs.email.batcher import EmailBatcher

log = logging.getLogger(__name__)


# How long another live process's claim is waited for before asking again: by then a dead
# claimer's heartbeat is stale (process_info.alive) and the claim can be taken over.
CLAIMED_ELSEWHERE_RETRY_S = LEASE_MS / 1000


@dataclass(eq=False)
class Submission:
    """One caller's draft and the future it waits on."""

    draft: Draft
    after: AfterSettled | None
    max_attempts: int | None
    future: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def __post_init__(self) -> None:
        # A cancelled caller never reads its result: mark an error read so asyncio does not
        # report it as lost.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def resolve(self, result: Outcome | BaseException) -> None:
        if self.future.done():
            return
        if isinstance(result, asyncio.CancelledError):  # the flush was cancelled (shutdown)
            self.future.cancel()
        elif isinstance(result, BaseException):
            self.future.set_exception(result)
        else:
            self.future.set_result(result)


async def flush(
    ctx: Ctx,
    provider: EmailProvider,
    submissions: Sequence[Submission],
    batcher: EmailBatcher,
    *,
    capacity: int,
    take_slot: Callable[[], Awaitable[None]],
) -> None:
    """Claim, send and settle `submissions` (distinct keys), filling the request up to
    `capacity` with due one-off rows; resolves every future.

    `take_slot` takes the request's send slot after the claim commits, so the request leaves
    when the limiter says rather than one claim transaction later (the claim's duration
    varies; a provider counting a sliding second would see the difference). It raises
    `TimeoutError` when its bounded wait runs out: the claimed members are released with no
    attempt counted, as nothing was sent.
    """
    batch_id = uuid.uuid4()
    batcher.in_flight.add(batch_id)
    units: list[Unit] = []
    verdicts: dict[uuid.UUID, Verdict] = {}
    try:
        waiting: dict[uuid.UUID, Submission] = {}
        units = await _claim(ctx, provider, submissions, batch_id, batcher, waiting, capacity)
        if not units:
            return
        slotted = await take_slots(ctx, units, take_slot)
        if len(slotted) < len(units):
            await release(ctx, units[len(slotted) :], waiting, batcher.worker)
        if not slotted:
            return
        sender = ctx["settings"].email_from
        answers = await asyncio.gather(*(send(ctx, provider, unit, sender) for unit in slotted))
        verdicts = await _settle(ctx, provider, slotted, answers, waiting, batcher.worker)
    finally:
        batcher.in_flight.discard(batch_id)
        for unit in units:
            batcher.in_flight.discard(unit.batch_id)
        batcher.settle_swept(batch_id, units, verdicts)


async def _claim(
    ctx: Ctx,
    provider: EmailProvider,
    submissions: Sequence[Submission],
    batch_id: uuid.UUID,
    batcher: EmailBatcher,
    waiting: dict[uuid.UUID, Submission],
    capacity: int,
) -> list[Unit]:
    """The claim transaction; resolves the submissions it settles, returns the units to send."""
    by_key = {s.draft.key: s for s in submissions}
    worker, resend_ok = batcher.worker, safe_to_resend(provider)
    answered: list[tuple[Submission, Outcome | BaseException]] = []
    following: list[tuple[Submission, asyncio.Future[Outcome | None]]] = []
    units: list[Unit] = []
    reclaimed: dict[uuid.UUID, list[Found]] = {}
    try:
        async with ctx["sessions"].begin() as session:
            new = [_new_message(s.draft) for s in sorted(submissions, key=lambda s: s.draft.key)]
            inserted = await claims.insert_claimed(
                session, new, batch_id=batch_id, provider=provider.name, worker=worker
            )
            main_ids = [row_id for row_id, status in inserted.values() if status == "sending"]
            for key, (_, status) in inserted.items():
                if status == "suppressed":
                    answered.append((by_key[key], await _suppressed(session, by_key[key])))
            found = await claims.lock_existing(session, [k for k in by_key if k not in inserted])
            by_batch: dict[uuid.UUID, list[Found]] = {}
            for row in found:
                if row.batch_id is not None:
                    by_batch.setdefault(row.batch_id, []).append(row)
            suppressed_ids: list[uuid.UUID] = []
            review_ids: list[tuple[uuid.UUID, str]] = []
            for row in found:
                submission = by_key.get(row.key)
                if submission is None:
                    continue  # another member of a batch found `sending`: handled with it
                if row.status in claims.SETTLED:
                    settled = cast(Status, row.status)
                    outcome = Outcome(
                        row.key, settled, False, row.provider_message_id, row.last_error
                    )
                    answered.append((submission, await _after(session, submission, outcome)))
                elif row.status == "pending" and row.suppressed:
                    suppressed_ids.append(row.id)
                    answered.append((submission, await _suppressed(session, submission)))
                elif row.status == "pending":
                    main_ids.append(row.id)
                elif row.claimed_by == worker and row.key in batcher.swept:
                    # This process's sweep is sending it: the job gets that batch's answer.
                    following.append((submission, batcher.swept[row.key]))
                elif await claim_is_live(ctx, row, batcher):
                    # Retried once the claim has settled or, its process dead, can be taken over:
                    # a sweep elsewhere answers within a second, a dead one's heartbeat goes stale
                    # within CLAIMED_ELSEWHERE_RETRY_S. Sooner would only spend the job's tries.
                    claimed = f"email {row.key} is being sent by another try"
                    answered.append((submission, RateLimited(claimed, CLAIMED_ELSEWHERE_RETRY_S)))
                elif not resend_ok:
                    detail = (
                        f"found mid-send after a crash (attempt {row.attempts}); {provider.name} "
                        "cannot deduplicate, so it was not resent: check the provider's activity"
                    )
                    log.warning("email %s held for review: %s", row.key, detail)
                    review_ids.append((row.id, detail))
                    outcome = Outcome(row.key, "review", True, None, detail)
                    answered.append((submission, await _after(session, submission, outcome)))
                else:
                    # Taken over: the whole batch, as stored, under its own key.
                    old = row.batch_id or uuid.uuid4()  # a row from before batches: a batch of one
                    reclaimed.setdefault(old, by_batch.get(old, [row]) if row.batch_id else [row])
            await claims.mark(session, suppressed_ids, "suppressed", claims.SUPPRESSED_DETAIL)
            for row_id, detail in review_ids:
                await claims.mark(session, [row_id], "review", detail)
            await claims.claim_pending(
                session, main_ids, batch_id=batch_id, provider=provider.name, worker=worker
            )
            room = capacity - len(main_ids)
            swept = await claims.sweep(
                session,
                room,
                exclude=batcher.queued_keys(),
                batch_id=batch_id,
                provider=provider.name,
                worker=worker,
            )
            batcher.note_swept(
                batch_id, [key for key, status in swept.items() if status == "sending"]
            )
            if swept:
                batcher.sweep_more(ctx, provider)
            if main_ids or "sending" in swept.values():
                members = await claims.unit_rows(session, batch_id)
                units.append(Unit(batch_id, members, {m.id for m in members}, fresh=True))
            for old, rows in reclaimed.items():
                batcher.in_flight.add(old)
                holding = [r.id for r in rows if r.status == "sending"]
                await claims.reclaim(
                    session, holding, batch_id=old, provider=provider.name, worker=worker
                )
                members = await claims.unit_rows(session, old)
                units.append(Unit(old, members, set(holding), fresh=False))
            for unit in units:
                for member in unit.members:
                    if member.id in unit.held and member.key in by_key:
                        waiting[member.id] = by_key[member.key]
    except BaseException:
        # The claim rolled back: a batch taken over here is no longer in flight here.
        batcher.in_flight.difference_update(reclaimed)
        raise
    for submission, result in answered:
        submission.resolve(result)
    for submission, swept_future in following:
        swept_future.add_done_callback(partial(_follow, submission))
    return units


def _follow(submission: Submission, swept: asyncio.Future[Outcome | None]) -> None:
    outcome = None if swept.cancelled() else swept.result()
    if outcome is None:
        submission.resolve(TransientError(f"email {submission.draft.key} is being retried"))
    else:
        submission.resolve(outcome)


def _new_message(draft: Draft) -> NewMessage:
    return NewMessage(
        draft.key, draft.to, draft.subject, draft.html, draft.text, dict(draft.headers)
    )


async def _after(session: Any, submission: Submission, outcome: Outcome) -> Outcome:
    if submission.after is not None:
        await submission.after(session, outcome)
    return outcome


async def _suppressed(session: Any, submission: Submission) -> Outcome:
    log.info("email %s not sent: its recipient is suppressed", submission.draft.key)
    outcome = Outcome(submission.draft.key, "suppressed", True, None, claims.SUPPRESSED_DETAIL)
    return await _after(session, submission, outcome)


async def claim_is_live(ctx: Ctx, row: Found, batcher: EmailBatcher) -> bool:
    """Whether a `sending` row's claimer may still be sending it (then it must not be resent).

    Not live: past the lease, released (a send that ended without a verdict), this process's
    own batch no longer in flight, or another process whose heartbeat stopped.
    """
    if row.claim_age_s >= claims.SEND_LEASE_S or row.claimed_by is None:
        return False
    if row.claimed_by == batcher.worker:
        return row.batch_id in batcher.in_flight
    return await process_info.alive(ctx["redis"], row.claimed_by)


def _verdict(
    answer: MemberAnswer | BaseException, unit: Unit, member: Member, resend_ok: bool
) -> Verdict:
    if isinstance(answer, str):
        return Verdict("sent", message_id=answer)
    if isinstance(answer, PermanentError):
        return Verdict("failed", str(answer))
    given_back = -1 if isinstance(answer, RateLimited | ProviderFault) else 0
    if isinstance(answer, DeliveryUnknown) and not resend_ok:
        log.warning("email %s may have been delivered; held for review: %s", member.key, answer)
        return Verdict("review", str(answer))
    if unit.fresh and not isinstance(answer, DeliveryUnknown):
        return Verdict("pending", str(answer), delta=given_back)
    return Verdict("sending", str(answer), delta=given_back)


async def _settle(
    ctx: Ctx,
    provider: EmailProvider,
    units: list[Unit],
    answers: list[list[MemberAnswer] | BaseException],
    waiting: dict[uuid.UUID, Submission],
    worker: str,
) -> dict[uuid.UUID, Verdict]:
    resend_ok = safe_to_resend(provider)
    verdicts: dict[uuid.UUID, Verdict] = {}
    raised: dict[uuid.UUID, BaseException] = {}
    for unit, answer in zip(units, answers, strict=True):
        if isinstance(answer, BaseException) and not isinstance(answer, Exception):
            raise answer
        for index, member in enumerate(unit.members):
            member_answer = answer if isinstance(answer, BaseException) else answer[index]
            if member.id not in unit.held:
                if member.status == "review" and isinstance(member_answer, str):
                    # Held for review after an earlier request of this batch; the provider's
                    # answer under the batch's key now says it was delivered.
                    verdicts[member.id] = Verdict("sent", message_id=member_answer)
                continue
            verdict = _verdict(member_answer, unit, member, resend_ok)
            submission = waiting.get(member.id)
            if verdict.status in ("pending", "sending") and verdict.delta == 0:
                limit = submission.max_attempts if submission is not None else None
                if limit is not None and member.attempts >= limit:
                    # A cron has no arq retry per message: the last counted attempt fails it.
                    detail = (
                        f"gave up after {member.attempts} attempts; last error: {verdict.error}"
                    )
                    verdict = Verdict("failed", detail)
            if verdict.status in ("pending", "sending"):
                assert isinstance(member_answer, BaseException)
                raised[member.id] = member_answer
            verdicts[member.id] = verdict
    await _write(ctx, units, verdicts, waiting, raised, worker)
    await pause_or_halt(ctx, answers)
    return verdicts


async def _write(
    ctx: Ctx,
    units: list[Unit],
    verdicts: dict[uuid.UUID, Verdict],
    waiting: dict[uuid.UUID, Submission],
    raised: dict[uuid.UUID, BaseException],
    worker: str,
) -> None:
    """The settle transaction: every row in one statement, then each waiting caller's hook."""
    keys = {m.id: m.key for unit in units for m in unit.members}

    def outcome(member_id: uuid.UUID) -> Outcome:
        v = verdicts[member_id]
        status = cast(Status, v.status)  # only settled verdicts (sent, failed, review) get here
        return Outcome(keys[member_id], status, True, v.message_id, v.error)

    hooked = [i for i in verdicts if i not in raised and i in waiting]
    try:
        async with ctx["sessions"].begin() as session:
            await claims.settle(session, verdicts, worker=worker)
            many: dict[type[ManyHook], list[tuple[ManyHook, Outcome]]] = {}
            for member_id in hooked:
                hook = waiting[member_id].after
                if isinstance(hook, ManyHook):  # one statement for all of a kind
                    many.setdefault(type(hook), []).append((hook, outcome(member_id)))
                else:
                    await _after(session, waiting[member_id], outcome(member_id))
            for kind, hooks in many.items():
                await kind.run_many(session, hooks)
    except Exception:
        if not hooked:
            raise
        # A hook failed (a bug in one caller's state change): settle member by member, so
        # one hook's failure leaves its own row claimed for a retry and nobody else's.
        await _write_one_by_one(ctx, verdicts, waiting, raised, hooked, outcome, worker)
        return
    for member_id, submission in waiting.items():
        if member_id in raised:
            submission.resolve(raised[member_id])
        elif member_id in verdicts:
            submission.resolve(outcome(member_id))


async def _write_one_by_one(
    ctx: Ctx,
    verdicts: dict[uuid.UUID, Verdict],
    waiting: dict[uuid.UUID, Submission],
    raised: dict[uuid.UUID, BaseException],
    hooked: list[uuid.UUID],
    outcome: Any,
    worker: str,
) -> None:
    results: dict[uuid.UUID, Outcome | BaseException] = dict(raised)
    async with ctx["sessions"].begin() as session:
        plain = {i: v for i, v in verdicts.items() if i not in hooked}
        await claims.settle(session, plain, worker=worker)
        for member_id in hooked:
            try:
                async with session.begin_nested():
                    await claims.settle(session, {member_id: verdicts[member_id]}, worker=worker)
                    results[member_id] = await _after(
                        session, waiting[member_id], outcome(member_id)
                    )
            except Exception as exc:
                results[member_id] = exc
    for member_id, submission in waiting.items():
        if member_id in results:
            submission.resolve(results[member_id])

"""The fair-share scripts against real Redis and PostgreSQL, one try at a time, as the job
wrapper calls them: who is admitted, who is parked, in which order the parked are woken."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.worker import Retry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from jobs.imports import process_contacts_import
from tests.fairness.conftest import (
    import_times,
    new_import,
    picked_up,
    score_s_from_now,
    settings_with,
)
from tests.support.ctx import CtxOpener
from tests.support.redis_replies import reply
from tests.support.users import new_user
from worker import fairness, stats
from worker.client import JobsClient
from worker.context import Ctx
from worker.fairness import PARK_RECHECK_S, Claim, Share
from worker.routes import import_job_id
from worker.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


async def try_of(ctx: Ctx, redis: aioredis.Redis, import_id: uuid.UUID) -> Claim:
    """A worker's try of the import: arq's pickup, then the claim before the job's body."""
    arq_id = import_job_id(import_id)
    await picked_up(redis, arq_id)
    ctx["job_id"] = arq_id
    claim = await fairness.claim(ctx)
    assert claim is not None
    return claim


async def finished(sessions: Sessions, claim: Claim) -> None:
    """What the import's body commits last."""
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE contact_import_jobs SET status = 'completed' WHERE id = :id"),
            {"id": claim.job_id.removeprefix("import:")},
        )


async def ended(ctx: Ctx, redis: aioredis.Redis, claim: Claim) -> int:
    """The try ended: the body committed, the wrapper releases the turn, arq drops the
    in-progress key."""
    await finished(ctx["sessions"], claim)
    woken = await fairness.release(ctx["redis"], claim)
    await redis.delete(in_progress_key_prefix + claim.job_id)
    return woken


async def waiting(redis: aioredis.Redis, share: Share) -> list[str]:
    return [member.decode() for member in await redis.zrange(share.waiting_key, 0, -1)]


async def test_over_the_cap_jobs_park_in_the_users_order_and_wake_one_per_freed_slot(
    open_ctx: CtxOpener, jobs_client: JobsClient, redis_raw: aioredis.Redis, sessions: Sessions
) -> None:
    a, b = await new_user(sessions), await new_user(sessions)
    first, second, third = [await new_import(jobs_client, a) for _ in range(3)]
    ctx = await open_ctx("imports")

    running = await try_of(ctx, redis_raw, first)
    assert running.admitted
    # Picked up out of order (another worker, a retry): the wait is still in enqueue order.
    late = await try_of(ctx, redis_raw, third)
    early = await try_of(ctx, redis_raw, second)
    assert (late.admitted, early.admitted) == (False, False)
    assert await waiting(redis_raw, running.share) == [import_job_id(second), import_job_id(third)]
    for claim in (late, early):
        due_in_s = await score_s_from_now(redis_raw, "imports", claim.job_id)
        assert due_in_s is not None and due_in_s > PARK_RECHECK_S - 5
        # The try arq counted when it picked the job up is given back.
        assert int(await redis_raw.get(retry_key_prefix + claim.job_id) or 0) == 0
        # Kept past arq's day from enqueue, so a long wait does not expire the job.
        assert await redis_raw.pttl(job_key_prefix + claim.job_id) > 23 * 3600 * 1000

    other = await try_of(ctx, redis_raw, await new_import(jobs_client, b))
    assert other.admitted  # another user's job passes A's waiting ones

    assert await ended(ctx, redis_raw, running) == 1
    second_due = await score_s_from_now(redis_raw, "imports", import_job_id(second))
    third_due = await score_s_from_now(redis_raw, "imports", import_job_id(third))
    assert second_due is not None and second_due <= 0
    assert third_due is not None and third_due > 60
    # The third is picked up before the woken second: it waits on.
    assert not (await try_of(ctx, redis_raw, third)).admitted
    assert (await try_of(ctx, redis_raw, second)).admitted
    assert await waiting(redis_raw, running.share) == [import_job_id(third)]


async def test_a_cap_of_two_admits_two(
    open_ctx: CtxOpener,
    settings: Settings,
    jobs_client: JobsClient,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
) -> None:
    user = await new_user(sessions)
    ids = [await new_import(jobs_client, user) for _ in range(3)]
    ctx = await open_ctx("imports", settings=settings_with(settings, import_max_running_per_user=2))
    claims = [await try_of(ctx, redis_raw, import_id) for import_id in ids]
    assert [claim.admitted for claim in claims] == [True, True, False]
    assert claims[0].share.cap == 2


async def test_an_older_import_picked_up_at_the_same_moment_goes_first(
    open_ctx: CtxOpener, jobs_client: JobsClient, redis_raw: aioredis.Redis, sessions: Sessions
) -> None:
    user = await new_user(sessions)
    first, second = [await new_import(jobs_client, user) for _ in range(2)]
    ctx = await open_ctx("imports")
    # Two workers picked both up; the younger one's claim ran first: it must not pass.
    younger = await try_of(ctx, redis_raw, second)
    assert not younger.admitted
    older = await try_of(ctx, redis_raw, first)
    assert older.admitted
    assert await ended(ctx, redis_raw, older) == 1
    assert (await try_of(ctx, redis_raw, second)).admitted


async def test_a_slot_lives_as_long_as_its_jobs_lease(
    open_ctx: CtxOpener, jobs_client: JobsClient, redis_raw: aioredis.Redis, sessions: Sessions
) -> None:
    user = await new_user(sessions)
    first, second, third = [await new_import(jobs_client, user) for _ in range(3)]
    ctx = await open_ctx("imports")
    holder = await try_of(ctx, redis_raw, first)
    assert holder.admitted
    assert not (await try_of(ctx, redis_raw, second)).admitted
    # The holder's re-run (its worker was stopped, the job came back) keeps its slot.
    assert (await try_of(ctx, redis_raw, first)).admitted
    # Its body committed, then the worker was SIGKILLed before the release: while the
    # lease lives the slot is taken...
    await finished(sessions, holder)
    assert not (await try_of(ctx, redis_raw, second)).admitted
    # ...and nothing renews the lease: it runs out, the slot with it.
    await redis_raw.delete(in_progress_key_prefix + holder.job_id)
    assert (await try_of(ctx, redis_raw, second)).admitted
    assert not (await try_of(ctx, redis_raw, third)).admitted


async def test_a_waiting_job_that_left_the_queue_is_passed_over(
    open_ctx: CtxOpener,
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
) -> None:
    user = await new_user(sessions)
    first, second, third = [await new_import(jobs_client, user) for _ in range(3)]
    ctx = await open_ctx("imports")
    holder = await try_of(ctx, redis_raw, first)
    for import_id in (second, third):
        assert not (await try_of(ctx, redis_raw, import_id)).admitted
    # Redis lost the second's job (or it was finished by another way): nobody will run it.
    await reply(arq_redis.zrem("imports", import_job_id(second)))
    assert await ended(ctx, redis_raw, holder) == 1
    due_in_s = await score_s_from_now(redis_raw, "imports", import_job_id(third))
    assert due_in_s is not None and due_in_s <= 0
    assert await waiting(redis_raw, holder.share) == [import_job_id(third)]


async def test_a_finished_or_cancelled_import_is_not_held_back(
    open_ctx: CtxOpener, jobs_client: JobsClient, redis_raw: aioredis.Redis, sessions: Sessions
) -> None:
    user = await new_user(sessions)
    first, second = [await new_import(jobs_client, user) for _ in range(2)]
    ctx = await open_ctx("imports")
    holder = await try_of(ctx, redis_raw, first)
    await jobs_client.cancel_import(second)
    cancelled = await try_of(ctx, redis_raw, second)
    # Admitted without a slot: its job only records the cancel.
    assert cancelled.admitted
    assert [m.decode() for m in await redis_raw.zrange(holder.share.running_key, 0, -1)] == [
        holder.job_id
    ]


@pytest.mark.parametrize("job_id", ["send:welcome", "test-1234", "import:not-a-uuid"])
async def test_jobs_that_name_no_row_are_not_shared(
    open_ctx: CtxOpener, job_id: str, redis_raw: aioredis.Redis
) -> None:
    ctx = await open_ctx("imports")
    ctx["job_id"] = job_id
    assert await fairness.claim(ctx) is None
    assert not [key async for key in redis_raw.scan_iter(match=fairness.KEY_PREFIX + "*")]


async def test_an_import_of_a_deleted_row_is_not_shared(open_ctx: CtxOpener) -> None:
    ctx = await open_ctx("imports")
    ctx["job_id"] = import_job_id(uuid.uuid4())
    assert await fairness.claim(ctx) is None


async def test_a_park_parks_the_users_younger_due_jobs_too(
    open_ctx: CtxOpener, jobs_client: JobsClient, redis_raw: aioredis.Redis, sessions: Sessions
) -> None:
    a, b = await new_user(sessions), await new_user(sessions)
    first, second, *younger = [await new_import(jobs_client, a) for _ in range(4)]
    running_elsewhere = await new_import(jobs_client, a)
    others = await new_import(jobs_client, b)
    await picked_up(redis_raw, import_job_id(running_elsewhere))  # claimed by another worker
    ctx = await open_ctx("imports")
    holder = await try_of(ctx, redis_raw, first)
    assert not (await try_of(ctx, redis_raw, second)).admitted
    # The younger ones are parked without a pickup each (arq starts one job per free slot
    # per poll), in order; a job another worker has claimed, and other users', are left.
    assert await waiting(redis_raw, holder.share) == [import_job_id(i) for i in [second, *younger]]
    for import_id in younger:
        due_in_s = await score_s_from_now(redis_raw, "imports", import_job_id(import_id))
        assert due_in_s is not None and due_in_s > 60
    for import_id in (running_elsewhere, others):
        due_in_s = await score_s_from_now(redis_raw, "imports", import_job_id(import_id))
        assert due_in_s is not None and due_in_s <= 0
    assert await ended(ctx, redis_raw, holder) == 1
    assert (await try_of(ctx, redis_raw, second)).admitted


async def test_a_claim_that_cannot_reach_the_database_comes_back_later_with_its_try(
    open_ctx: CtxOpener,
    settings: Settings,
    jobs_client: JobsClient,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
) -> None:
    import_id = await new_import(jobs_client, await new_user(sessions))
    # Nothing listens on port 1: PostgreSQL is unreachable for this worker.
    unreachable = settings.database.set(port=1).render_as_string(hide_password=False)
    ctx = await open_ctx("imports", settings=settings_with(settings, database_url=unreachable))
    ctx["job_id"] = import_job_id(import_id)
    await picked_up(redis_raw, ctx["job_id"])
    with pytest.raises(Retry) as caught:
        await process_contacts_import.run(ctx, job_id=str(import_id))
    assert (caught.value.defer_score or 0) > 0  # after a backoff, not at once
    assert int(await redis_raw.get(retry_key_prefix + ctx["job_id"]) or 0) == 0
    row = (await import_times(sessions, [import_id]))[0]
    assert row[0] == "pending"  # nothing recorded as failed, nothing lost


async def test_a_try_that_fails_right_after_taking_its_turn_gives_the_turn_back(
    open_ctx: CtxOpener,
    jobs_client: JobsClient,
    redis_raw: aioredis.Redis,
    sessions: Sessions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = await new_user(sessions)
    first, second = [await new_import(jobs_client, user) for _ in range(2)]
    ctx = await open_ctx("imports")
    parked = await try_of(ctx, redis_raw, second)  # behind the user's older, open first import
    assert not parked.admitted
    ctx["job_id"] = import_job_id(first)
    await picked_up(redis_raw, ctx["job_id"])

    async def bookkeeping_fails(*args: object, **kwargs: object) -> int:
        # try_started swallows Redis errors itself; whatever escapes it must not leak the turn.
        raise RuntimeError("the try's bookkeeping failed")

    monkeypatch.setattr(stats, "try_started", bookkeeping_fails)
    with pytest.raises(RuntimeError, match="bookkeeping failed"):
        await process_contacts_import.run(ctx, job_id=str(first))
    monkeypatch.undo()
    # The turn was taken and given back: its slot is free and the parked import was woken
    # (due now), not left for its recheck PARK_RECHECK_S later.
    running = [
        member.decode() for member in await redis_raw.zrange(parked.share.running_key, 0, -1)
    ]
    assert running == []
    due_in_s = await score_s_from_now(redis_raw, "imports", import_job_id(second))
    assert due_in_s is not None and due_in_s <= 0

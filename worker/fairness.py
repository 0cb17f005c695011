"""Fair sharing between users: at most N running imports (exports) per user, cluster-wide.

Without it one customer's twenty uploads take every imports slot while another's 500-row file
waits behind them. `IMPORT_MAX_RUNNING_PER_USER` and `EXPORT_MAX_RUNNING_PER_USER` cap how many
of one user's jobs run at once; a job over its cap gives its worker slot back at once and is
started when one of its user's running jobs ends, in the order the user enqueued; other
users' jobs pass it.

Shared jobs are those whose arq id names an import or export row (`worker.routes.row_of_job_id`:
`import:<id>`, its continuations, `export:<id>`). PostgreSQL gives the order: the row's user,
its `created_at` (so an import's continuation keeps its place), and the user's older rows still
open, which are ahead of it whether their jobs are parked, being picked up by another worker
this very moment, or backing off before a retry. Per user and kind, two sorted sets in Redis:

- `c360:fair:<kind>:<user>:running`: ids of the jobs holding one of the user's slots. A slot
  lives as long as its job's `arq:in-progress:` key, the lease `worker/lease.py` renews: the
  slot of a SIGKILLed worker's job is free within `LEASE_MS`, with no renewal of its own. A
  re-run of a job that still holds a slot (after a crash or a shutdown) keeps it.
- `c360:fair:<kind>:<user>:waiting`: ids of the parked jobs, scored by their row's
  `created_at` (microseconds): whom to wake first. An entry whose job left arq's queue is
  dropped when seen.

`claim` (one Lua script, before the job's body: worker/job.py) admits the job when more slots
are free than the user has older open rows not running; otherwise it parks the job: its score
in arq's queue moves `PARK_RECHECK_S` ahead, the try arq counted when it started is given back
(waiting never uses up `MAX_RETRIES`), and its job key is kept alive while it waits. The wrapper
then raises `Retry(defer=0)`, with which arq leaves the score alone and only drops the
in-progress key: the worker slot is free at once. `release` (when the try ends, whatever its
outcome but a shutdown's cancel) frees the slot and moves the scores of the user's oldest
parked jobs, one per free slot, to now: the next poll of any worker starts them. A job ahead
that ended between the claim's read of PostgreSQL and its script found nobody to wake; a park
therefore reads the older rows once more and wakes itself if one of them has closed. The
recheck after `PARK_RECHECK_S` is only a backstop for a wake that was lost (a release that
could not reach Redis). Nothing here is the source of truth: after Redis lost its data the
reconciler re-enqueues from PostgreSQL and the jobs claim their turns again.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from sqlalchemy import ColumnElement, literal, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import ContactImportJob, Export
from worker.context import Ctx
from worker.routes import EXPORT_JOB_IDS, IMPORT_JOB_IDS, JobIdFormat, RowKind, row_of_job_id
from worker.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "c360:fair:"
# A parked job looks again after this long (plus up to a quarter more, so that a user's many
# parked jobs do not all come due in the same poll) in case the wake that was due got lost.
PARK_RECHECK_S = 120.0
# How many of a user's younger due jobs one park parks along with itself (see `claim`).
PARK_AHEAD_ROWS = 100
# A parked job's arq job key lives at least this long past each park: arq gives it a day from
# enqueue, and a job that waits longer than that would otherwise be dropped as "expired".
PARKED_JOB_KEY_KEEP_MS = 24 * 3600 * 1000
# The sets of a user nobody touched for a week are left to expire (a live parked job touches
# them every recheck).
SETS_TTL_MS = 7 * 24 * 3600 * 1000
OPEN_STATUSES = ("pending", "processing")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
JOB_IDS: dict[RowKind, JobIdFormat] = {"import": IMPORT_JOB_IDS, "export": EXPORT_JOB_IDS}

# Shared by both scripts: prune the slots whose job's lease is gone (never this job's own: a
# re-run after a crash keeps its slot), and find the oldest `n` waiting jobs still in arq's
# queue, dropping the entries of jobs that left it (finished, or lost with Redis's data).
_COMMON = """
local running, waiting, queue = KEYS[1], KEYS[2], KEYS[3]
local job, cap, now_ms, in_progress = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local function prune_running()
  for _, holder in ipairs(redis.call('ZRANGE', running, 0, -1)) do
    if holder ~= job and redis.call('EXISTS', in_progress .. holder) == 0 then
      redis.call('ZREM', running, holder)
    end
  end
end
local function live_waiting(n)
  local live = {}
  while #live < n do
    -- Entries before #live are live or were removed: the next page starts there.
    local page = redis.call('ZRANGE', waiting, #live, #live + 99)
    if #page == 0 then break end
    for _, member in ipairs(page) do
      if redis.call('ZSCORE', queue, member) then
        live[#live + 1] = member
        if #live == n then break end
      else
        redis.call('ZREM', waiting, member)
      end
    end
  end
  return live
end
local function wake(members)
  for _, member in ipairs(members) do
    -- LT: never later than it is (a job already due keeps its place among other users').
    redis.call('ZADD', queue, 'XX', 'LT', now_ms, member)
  end
end
local function touch(ttl_ms)
  redis.call('PEXPIRE', running, ttl_ms)
  redis.call('PEXPIRE', waiting, ttl_ms)
end
"""

# ARGV[5..]: the job's order (row created_at, microseconds), the park-until score, the job
# key's keep, the sets' TTL, arq's job and retry key prefixes, then the arq ids of the user's
# older open rows (a running continuation `<id>:from:<n>` counts for its row `<id>`).
# Returns 1 admitted, 0 parked.
_CLAIM = (
    _COMMON
    + """
local order, park_until, keep_ms, ttl_ms = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local job_key, retry_key = ARGV[9] .. job, ARGV[10] .. job
prune_running()
touch(ttl_ms)
if redis.call('ZSCORE', running, job) then
  redis.call('ZREM', waiting, job)
  return 1
end
local holders = redis.call('ZRANGE', running, 0, -1)
local ahead = 0
for i = 11, #ARGV do
  local row, runs = ARGV[i], false
  for _, holder in ipairs(holders) do
    if holder == row or string.sub(holder, 1, #row + 1) == row .. ':' then runs = true end
  end
  if not runs then ahead = ahead + 1 end
end
local free = cap - #holders
if free > ahead then
  redis.call('ZREM', waiting, job)
  redis.call('ZADD', running, now_ms, job)
  return 1
end
redis.call('ZADD', waiting, order, job)
if free > 0 then
  -- Older jobs of this user are due to take the free slots: make sure they are woken.
  wake(live_waiting(free))
end
redis.call('ZADD', queue, 'XX', park_until, job)
redis.call('PEXPIRE', job_key, keep_ms, 'GT')
if tonumber(redis.call('GET', retry_key) or '0') > 0 then
  redis.call('DECR', retry_key)
end
return 0
"""
)

# ARGV[5..]: the park-until score, the job key's keep, arq's job key prefix, then pairs of
# (arq id, order) of the user's younger open rows. Parks those that are due and that no worker
# has claimed, without a pickup each. Returns how many it parked.
_PARK_YOUNGER = (
    _COMMON
    + """
local park_until, keep_ms, job_keys = ARGV[5], ARGV[6], ARGV[7]
local parked = 0
for i = 8, #ARGV, 2 do
  local member, member_order = ARGV[i], ARGV[i + 1]
  local score = redis.call('ZSCORE', queue, member)
  if score and tonumber(score) <= tonumber(now_ms)
      and redis.call('EXISTS', in_progress .. member) == 0
      and not redis.call('ZSCORE', running, member) then
    redis.call('ZADD', waiting, member_order, member)
    redis.call('ZADD', queue, 'XX', park_until, member)
    redis.call('PEXPIRE', job_keys .. member, keep_ms, 'GT')
    parked = parked + 1
  end
end
return parked
"""
)

# Returns how many waiting jobs were woken.
_RELEASE = (
    _COMMON
    + """
local ttl_ms = ARGV[5]
redis.call('ZREM', running, job)
redis.call('ZREM', waiting, job)
prune_running()
local free = cap - redis.call('ZCARD', running)
local woken = {}
if free > 0 then
  woken = live_waiting(free)
  wake(woken)
end
touch(ttl_ms)
return #woken
"""
)


@dataclass(frozen=True, slots=True)
class Share:
    """One user's share of one kind of job: its cap and its two sets in Redis."""

    kind: RowKind
    user_id: uuid.UUID
    cap: int

    @property
    def running_key(self) -> str:
        return f"{KEY_PREFIX}{self.kind}:{self.user_id}:running"

    @property
    def waiting_key(self) -> str:
        return f"{KEY_PREFIX}{self.kind}:{self.user_id}:waiting"


@dataclass(frozen=True, slots=True)
class Claim:
    """A shared job's turn: `admitted`, or parked until its user's running job ends."""

    job_id: str
    queue: str
    share: Share
    admitted: bool


def cap_of(settings: Settings, kind: RowKind) -> int:
    if kind == "import":
        return settings.import_max_running_per_user
    return settings.export_max_running_per_user


def order_us(created_at: datetime) -> int:
    """`created_at` as whole microseconds since 1970: exact in a sorted set's double score."""
    return (created_at - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class _Row:
    user_id: uuid.UUID
    created_at: datetime
    has_work: bool  # open, and for an import no cancel requested


def _table(kind: RowKind) -> type[ContactImportJob] | type[Export]:
    return ContactImportJob if kind == "import" else Export


def _has_work(kind: RowKind) -> ColumnElement[bool]:
    if kind == "import":
        return ContactImportJob.status.in_(OPEN_STATUSES) & ContactImportJob.cancel_requested.is_(
            False
        )
    return Export.status.in_(OPEN_STATUSES)


async def _row(
    sessions: async_sessionmaker[AsyncSession], kind: RowKind, row_id: uuid.UUID
) -> _Row | None:
    table = _table(kind)
    async with sessions() as session:
        found = (
            await session.execute(
                select(table.user_id, table.created_at, _has_work(kind)).where(table.id == row_id)
            )
        ).one_or_none()
    return None if found is None else _Row(found[0], found[1], bool(found[2]))


async def _older_open(
    sessions: async_sessionmaker[AsyncSession],
    kind: RowKind,
    row_id: uuid.UUID,
    row: _Row,
    limit: int,
) -> list[str]:
    """The arq ids of the user's oldest `limit` rows enqueued before `row` and still open."""
    table = _table(kind)
    async with sessions() as session:
        ids = await session.scalars(
            select(table.id)
            .where(
                table.user_id == row.user_id,
                _has_work(kind),
                # (created_at, id): rows of one instant keep one order, the sets' member order.
                tuple_(table.created_at, table.id)
                < tuple_(literal(row.created_at), literal(row_id)),
            )
            .order_by(table.created_at, table.id)
            .limit(limit)
        )
        return [JOB_IDS[kind].build(i) for i in ids]


async def _younger_open(
    sessions: async_sessionmaker[AsyncSession], kind: RowKind, row_id: uuid.UUID, row: _Row
) -> list[tuple[str, int]]:
    """(arq id, order) of the user's oldest `PARK_AHEAD_ROWS` open rows enqueued after `row`."""
    table = _table(kind)
    async with sessions() as session:
        found = await session.execute(
            select(table.id, table.created_at)
            .where(
                table.user_id == row.user_id,
                _has_work(kind),
                tuple_(table.created_at, table.id)
                > tuple_(literal(row.created_at), literal(row_id)),
            )
            .order_by(table.created_at, table.id)
            .limit(PARK_AHEAD_ROWS)
        )
        return [(JOB_IDS[kind].build(i), order_us(created_at)) for i, created_at in found]


async def claim(ctx: Ctx) -> Claim | None:
    """This try's turn among its user's jobs; None for a job no user's share covers.

    A row that is finished, or an import whose cancel was requested, is admitted at once: its
    job only records that, and its release still wakes the user's next job.
    """
    named = row_of_job_id(ctx["job_id"])
    if named is None:
        return None
    kind, row_id = named
    sessions = ctx["sessions"]
    row = await _row(sessions, kind, row_id)
    if row is None:
        return None  # no row: the job's body fails it with its own message
    share = Share(kind, row.user_id, cap_of(ctx["settings"], kind))
    job_id, queue = ctx["job_id"], ctx["queue_name"]
    if not row.has_work:
        return Claim(job_id, queue, share, admitted=True)
    # Enough to decide: at most `cap` of them hold a slot, and `cap` more fill every free one.
    limit = 2 * share.cap + 1
    ahead = await _older_open(sessions, kind, row_id, row, limit)
    now_ms = int(time.time() * 1000)
    park_until_ms = now_ms + int(PARK_RECHECK_S * 1000 * (1 + random.random() / 4))
    admitted = await _eval(
        ctx["redis"],
        _CLAIM,
        share,
        queue,
        job_id,
        now_ms,
        order_us(row.created_at),
        park_until_ms,
        PARKED_JOB_KEY_KEEP_MS,
        SETS_TTL_MS,
        job_key_prefix,
        retry_key_prefix,
        *ahead,
    )
    claimed = Claim(job_id, queue, share, admitted=bool(admitted))
    if admitted:
        return claimed
    if set(await _older_open(sessions, kind, row_id, row, limit)) < set(ahead):
        # One ahead ended after the read above and before the script: its release found
        # nobody parked to wake. Come back at the next poll.
        await cast(Any, ctx["redis"].zadd(queue, {job_id: now_ms}, xx=True, lt=True))
    younger = await _younger_open(sessions, kind, row_id, row)
    if younger:
        # arq starts at most as many jobs per poll as it has free slots, so a burst parked one
        # pickup at a time would hold other users' jobs back for many polls: park the rest of
        # this user's due jobs now, in one step.
        await _eval(
            ctx["redis"],
            _PARK_YOUNGER,
            share,
            queue,
            job_id,
            now_ms,
            park_until_ms,
            PARKED_JOB_KEY_KEEP_MS,
            job_key_prefix,
            *(value for pair in younger for value in pair),
        )
    return claimed


async def release(redis: ArqRedis, claim: Claim) -> int:
    """Free the claim's slot and wake its user's next waiting jobs; how many were woken."""
    now_ms = int(time.time() * 1000)
    woken = await _eval(
        redis, _RELEASE, claim.share, claim.queue, claim.job_id, now_ms, SETS_TTL_MS
    )
    return int(woken)


async def _eval(
    redis: ArqRedis, script: str, share: Share, queue: str, job_id: str, now_ms: int, *more: Any
) -> Any:
    keys = (share.running_key, share.waiting_key, queue)
    args = (job_id, share.cap, now_ms, in_progress_key_prefix, *more)
    # Plain EVAL: a couple of KiB per job start, and nothing to reload after a Redis restart
    # or failover (EVALSHA would answer NOSCRIPT there).
    return await cast(Any, redis.eval(script, len(keys), *keys, *args))

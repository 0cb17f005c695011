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
in-progress key: the worker slot is free at once. A park also parks the user's younger jobs
that are due and unclaimed, without a pickup each: arq starts at most one job per free slot
per poll, so a burst parked one pickup at a time would hold other users back for many polls.
`release` (when the try ends, whatever its
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
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

from worker.context import Ctx
from worker.fairness.rows import older_open, order_us, row_of, younger_open
from worker.fairness.scripts import CLAIM, PARK_YOUNGER, RELEASE
from worker.routes import RowKind, row_of_job_id
from worker.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "c360:fair:"
# A parked job looks again after this long (plus up to a quarter more, so that a user's many
# parked jobs do not all come due in the same poll) in case the wake that was due got lost.
PARK_RECHECK_S = 120.0
# A parked job's arq job key lives at least this long past each park: arq gives it a day from
# enqueue, and a job that waits longer than that would otherwise be dropped as "expired".
PARKED_JOB_KEY_KEEP_MS = 24 * 3600 * 1000
# The sets of a user nobody touched for a week are left to expire (a live parked job touches
# them every recheck).
SETS_TTL_MS = 7 * 24 * 3600 * 1000


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
    row = await row_of(sessions, kind, row_id)
    if row is None:
        return None  # no row: the job's body fails it with its own message
    share = Share(kind, row.user_id, cap_of(ctx["settings"], kind))
    job_id, queue = ctx["job_id"], ctx["queue_name"]
    if not row.has_work:
        return Claim(job_id, queue, share, admitted=True)
    # Enough to decide: at most `cap` of them hold a slot, and `cap` more fill every free one.
    limit = 2 * share.cap + 1
    ahead = await older_open(sessions, kind, row_id, row, limit)
    now_ms = int(time.time() * 1000)
    park_until_ms = now_ms + int(PARK_RECHECK_S * 1000 * (1 + random.random() / 4))
    admitted = await _eval(
        ctx["redis"],
        CLAIM,
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
    if set(await older_open(sessions, kind, row_id, row, limit)) < set(ahead):
        # One ahead ended after the read above and before the script: its release found
        # nobody parked to wake. Come back at the next poll.
        await cast(Any, ctx["redis"].zadd(queue, {job_id: now_ms}, xx=True, lt=True))
    younger = await younger_open(sessions, kind, row_id, row)
    if younger:
        # The rest of this user's due jobs, in one step (see the module's docstring).
        await _eval(
            ctx["redis"],
            PARK_YOUNGER,
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
    woken = await _eval(redis, RELEASE, claim.share, claim.queue, claim.job_id, now_ms, SETS_TTL_MS)
    return int(woken)


async def _eval(
    redis: ArqRedis, script: str, share: Share, queue: str, job_id: str, now_ms: int, *more: Any
) -> Any:
    keys = (share.running_key, share.waiting_key, queue)
    args = (job_id, share.cap, now_ms, in_progress_key_prefix, *more)
    # Plain EVAL: a couple of KiB per job start, and nothing to reload after a Redis restart
    # or failover (EVALSHA would answer NOSCRIPT there).
    return await cast(Any, redis.eval(script, len(keys), *keys, *args))

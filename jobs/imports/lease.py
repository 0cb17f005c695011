"""The import's lease on its job row: one runner at a time, through any connection pool.

A session advisory lock would need one server session for the whole import, which PgBouncer
in transaction pooling mode does not give (each transaction may run on another server
connection). The lease is plain row data instead, so it works the same with or without a
pooler (one code path):

- `take`: a conditional UPDATE sets `lease_owner` (this run's random token) and
  `lease_expires_at` when nobody holds the lease or the holder's has expired. Expiry is read
  on PostgreSQL's clock only, so the workers' clocks do not matter.
- Renewed every `RENEW_EVERY_S` by a timer (the counting pass and a slow file have no batch
  to renew it with) and in each batch's own transactions (`checkpoint`).
- Checked, as a fence, in every write of the run: each batch transaction's UPDATE of the job
  row carries `lease_owner = <this run>` in its WHERE, so a run whose lease was taken over
  commits nothing more (its part rolls back and it raises `ImportRunningElsewhere`).
  Ownership, not the clock, is what a write checks: an expired lease nobody took is still
  this run's, and a lease taken over is lost whatever the time.
- A SIGKILLed runner renews nothing: its lease expires within `LEASE_S` (less than arq's
  own 15 s in-progress lease, `worker/lease.py`, so the redelivery normally finds it free)
  and the next try resumes from the checkpoint.
- A run that finds the lease held watches it for one renewal period (`PROBE_S`): a live
  holder renews it, and this delivery bounces (`ImportRunningElsewhere`, back once the lease
  could have expired); a lease nobody renews belongs to a dead run, and is waited out (at
  most `LEASE_S`) and taken, rather than bouncing the delivery and using up a try. That is
  what happens when the reconciler re-enqueues the import of a worker that died with Redis's
  data: its lease may still run for seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from worker.errors import RateLimited

log = logging.getLogger(__name__)

LEASE_S = 10.0
RENEW_EVERY_S = 2.0
# Long enough to see a live holder's renewal (with slack for a slow round trip).
PROBE_S = RENEW_EVERY_S * 1.5
RELEASE_WAIT_MS = 2000

# Free, expired, or already this run's (taking twice is harmless; tokens are per run).
_TAKE = text(
    "UPDATE contact_import_jobs SET lease_owner = :owner,"
    " lease_expires_at = now() + make_interval(secs => :lease_s)"
    " WHERE id = :id AND (lease_owner IS NULL OR lease_expires_at <= now()"
    " OR lease_owner = :owner) RETURNING id"
)
_HELD = text(
    "SELECT lease_expires_at, extract(epoch FROM lease_expires_at - now())"
    " FROM contact_import_jobs WHERE id = :id"
)
_RENEW = text(
    "UPDATE contact_import_jobs SET lease_expires_at = now() + make_interval(secs => :lease_s)"
    " WHERE id = :id AND lease_owner = :owner RETURNING id"
)
_RELEASE = text(
    "UPDATE contact_import_jobs SET lease_owner = NULL, lease_expires_at = NULL"
    " WHERE id = :id AND lease_owner = :owner"
)


class ImportRunningElsewhere(RateLimited):
    """Another run holds this import's lease: this delivery comes back once that lease could
    have expired (and usually finds the import finished), so a lease left behind by a run
    that could not release it costs one try, not all of them."""

    def __init__(self, lease_left_s: float = LEASE_S) -> None:
        super().__init__("import is running elsewhere", retry_after_s=lease_left_s + 0.5)


def new_owner() -> str:
    """A token for one run: host and pid for the operator, random so no two runs share it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Held:
    """Someone else's lease as `take` found it."""

    expires_at: datetime
    left_s: float


async def take(
    sessions: async_sessionmaker[AsyncSession], import_id: uuid.UUID, owner: str
) -> Held | None:
    """Take the lease for `owner`: None when taken (or no such import: the caller's read
    says so), else the current holder's lease."""
    async with sessions.begin() as session:
        if await session.scalar(_TAKE, {"id": import_id, "owner": owner, "lease_s": LEASE_S}):
            return None
        found = (await session.execute(_HELD, {"id": import_id})).one_or_none()
    if found is None or found[0] is None:
        return None  # gone, or released in between: the caller's read decides
    return Held(found[0], max(0.0, float(found[1])))


async def take_unless_renewed(
    sessions: async_sessionmaker[AsyncSession], import_id: uuid.UUID, owner: str
) -> None:
    """Take the lease, waiting out one nobody renews; raise `ImportRunningElsewhere` as soon
    as the holder renews it (it is alive)."""
    first: Held | None = None
    while (held := await take(sessions, import_id, owner)) is not None:
        if first is not None and held.expires_at != first.expires_at:
            raise ImportRunningElsewhere(held.left_s)
        first = first or held
        await asyncio.sleep(min(held.left_s, PROBE_S) + 0.05)


@dataclass
class ImportLease:
    """This run's hold on an import; `owner` goes into every write's WHERE (`checkpoint`)."""

    sessions: async_sessionmaker[AsyncSession]
    import_id: uuid.UUID
    owner: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    async def renew(self) -> bool:
        """Extend the lease; False once another run has taken it over."""
        async with self.sessions.begin() as session:
            kept = await session.scalar(
                _RENEW, {"id": self.import_id, "owner": self.owner, "lease_s": LEASE_S}
            )
        if kept is None:
            self.lost.set()
        return kept is not None

    async def renew_forever(self) -> None:
        while not self.lost.is_set():
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                if not await self.renew():
                    # The batch fence stops the run at its next write; this is only the log.
                    log.warning("import %s: lease taken over by another run", self.import_id)
            except Exception as exc:
                # A lost connection: the next tick tries again; the fence keeps writes safe.
                log.warning("import %s: lease renewal failed (%s)", self.import_id, exc)

    async def release(self) -> None:
        try:
            await self._release()
        except Exception as exc:
            # Most often the connection died with the error that ended the run: SQLAlchemy
            # then recycles the pool's older connections, so a second try gets a fresh one.
            log.info("import %s: lease release failed (%s); once more", self.import_id, exc)
            await self._release()

    async def _release(self) -> None:
        async with self.sessions.begin() as session:
            # A run that is stopping (a shutdown's cancel) must not wait on whoever holds the
            # row; the lease expires by itself. SET LOCAL: this transaction only, so it holds
            # behind a transaction pooler too.
            await session.execute(text(f"SET LOCAL lock_timeout = '{RELEASE_WAIT_MS}ms'"))
            await session.execute(_RELEASE, {"id": self.import_id, "owner": self.owner})


@contextlib.asynccontextmanager
async def import_lease(
    sessions: async_sessionmaker[AsyncSession], import_id: uuid.UUID
) -> AsyncIterator[ImportLease]:
    """Yield this run's lease, renewed until exit and then released.

    Raises `ImportRunningElsewhere` when another live run holds it (`take_unless_renewed`).
    """
    owner = new_owner()
    await take_unless_renewed(sessions, import_id, owner)
    lease = ImportLease(sessions, import_id, owner)
    renewer = asyncio.create_task(lease.renew_forever(), name=f"import-lease-{import_id}")
    try:
        yield lease
    finally:
        renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewer
        try:
            await lease.release()
        except Exception as exc:
            # It expires within LEASE_S anyway; the error that ended the run matters more.
            log.warning("import %s: lease release failed (%s); it expires", import_id, exc)

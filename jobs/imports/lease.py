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
  and the next try resumes from the checkpoint. A lease that has missed two renewals is
  waited out (at most `STALE_BELOW_S`) instead of bouncing the delivery and using up a try.
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

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

log = logging.getLogger(__name__)

LEASE_S = 10.0
RENEW_EVERY_S = 2.0
# A live holder renews every RENEW_EVERY_S, so its lease has more than this left (two
# renewals of slack for a slow round trip); less: the holder is most likely gone.
STALE_BELOW_S = LEASE_S - 2 * RENEW_EVERY_S

# Free, expired, or already ours (a retry of the same run never happens: tokens are per run).
_TAKE = text(
    "UPDATE contact_import_jobs SET lease_owner = :owner,"
    " lease_expires_at = now() + make_interval(secs => :lease_s)"
    " WHERE id = :id AND (lease_owner IS NULL OR lease_expires_at <= now()"
    " OR lease_owner = :owner) RETURNING id"
)
_LEFT = text(
    "SELECT extract(epoch FROM lease_expires_at - now()) FROM contact_import_jobs WHERE id = :id"
)
_RENEW = text(
    "UPDATE contact_import_jobs SET lease_expires_at = now() + make_interval(secs => :lease_s)"
    " WHERE id = :id AND lease_owner = :owner RETURNING id"
)
_RELEASE = text(
    "UPDATE contact_import_jobs SET lease_owner = NULL, lease_expires_at = NULL"
    " WHERE id = :id AND lease_owner = :owner"
)


def new_owner() -> str:
    """A token for one run: host and pid for the operator, random so no two runs share it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


async def take(
    sessions: async_sessionmaker[AsyncSession], import_id: uuid.UUID, owner: str
) -> float | None:
    """Take the lease for `owner`: None when taken (or no such import: the caller's read
    says so), else the seconds the current holder's lease has left."""
    async with sessions.begin() as session:
        if await session.scalar(_TAKE, {"id": import_id, "owner": owner, "lease_s": LEASE_S}):
            return None
        left = await session.scalar(_LEFT, {"id": import_id})
    return None if left is None else max(0.0, float(left))


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
        async with self.sessions.begin() as session:
            await session.execute(_RELEASE, {"id": self.import_id, "owner": self.owner})


@contextlib.asynccontextmanager
async def import_lease(
    sessions: async_sessionmaker[AsyncSession], import_id: uuid.UUID
) -> AsyncIterator[ImportLease | None]:
    """Yield this run's lease, renewed until exit and then released; None: another run
    holds it (after waiting out a stale one, see the module docstring)."""
    owner = new_owner()
    left_s = await take(sessions, import_id, owner)
    if left_s is not None and left_s < STALE_BELOW_S:
        await asyncio.sleep(left_s + 0.05)
        left_s = await take(sessions, import_id, owner)
    if left_s is not None:
        yield None
        return
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

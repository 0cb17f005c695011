"""The web app's side: everything is enqueued through `JobsClient`, as an app would.

A call that fails because a fault hit it (Redis down, a terminated connection) is handled as
an app should: calls that are idempotent by design (`send_email` under the caller's key,
`join_waitlist`) are retried; an import or export is retried only if PostgreSQL shows that
the failed call created nothing (a row committed before its enqueue failed is the
reconciler's to finish, and a second import of the same file would be a different workload).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from arq.jobs import Job, JobStatus
from sqlalchemy import func, select

from bench.chaos.data import ImportUser, Population
from bench.chaos.workload import Workload
from db.models import ContactImportJob, Export
from worker.client import JobsClient
from worker.routes import SEND_WAITLIST_CAMPAIGN_HOURLY, SYNC_ALL_CONTACTS, Route, enqueue

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_PAUSE_S = 0.5
MAX_CALL_TRIES = 120  # a minute of pauses: longer than any fault of the plan lasts
EMAIL_CONCURRENCY = 16
CRON_ROUTES = (SEND_WAITLIST_CAMPAIGN_HOURLY, SYNC_ALL_CONTACTS)


def send_address(n: int) -> str:
    return f"send-{n}@chaos.test"


def waitlist_address(n: int) -> str:
    return f"waitlist-{n}@chaos.test"


class Driver:
    def __init__(
        self, jobs: JobsClient, workload: Workload, population: Population, seed: int
    ) -> None:
        self.jobs = jobs
        self.workload = workload
        self.population = population
        self.rng = random.Random(seed ^ 0xD21)
        self.seed = seed
        self.call_errors: Counter[str] = Counter()
        self.exported_importers: set[uuid.UUID] = set()
        self._cron_jobs: dict[str, str] = {}
        self._cron_runs = 0

    # -- calls that survive faults ---------------------------------------------------------

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        for _ in range(MAX_CALL_TRIES - 1):
            try:
                return await call()
            except (ValueError, LookupError):
                raise  # our own mistake: the soak's input is wrong, stop here
            except Exception as exc:
                self.call_errors[f"{what}: {type(exc).__name__}"] += 1
                await asyncio.sleep(RETRY_PAUSE_S)
        return await call()

    async def _created_since(self, model: Any, user_id: uuid.UUID, since: Any) -> bool:
        async def created() -> bool:
            async with self.jobs.sessions() as session:
                count = await session.scalar(
                    select(func.count()).where(model.user_id == user_id, model.created_at >= since)
                )
            return bool(count)

        return await self._call("check", created)

    async def _start_once(
        self, what: str, model: Any, user_id: uuid.UUID, call: Callable[[], Awaitable[Any]]
    ) -> None:
        """Run `call` once: retried only while PostgreSQL shows it created nothing."""

        async def now() -> Any:
            async with self.jobs.sessions() as session:
                return await session.scalar(select(func.now()))

        since = await self._call("now", now)
        for _ in range(MAX_CALL_TRIES):
            try:
                await call()
                return
            except (ValueError, LookupError):
                raise
            except Exception as exc:
                self.call_errors[f"{what}: {type(exc).__name__}"] += 1
                await asyncio.sleep(RETRY_PAUSE_S)
                if await self._created_since(model, user_id, since):
                    return  # committed; its enqueue failed: the reconciler takes it from here
        raise RuntimeError(f"{what} for {user_id} kept failing")

    # -- the workload ----------------------------------------------------------------------

    async def start_import(self, importer: ImportUser, *, reference: bool) -> None:
        user_id = importer.reference_id if reference else importer.user_id
        path = importer.path_for(user_id)
        await self._start_once(
            "import_contacts",
            ContactImportJob,
            user_id,
            lambda: self.jobs.import_contacts(user_id, path),
        )

    async def export(self, user_id: uuid.UUID, kind: str) -> None:
        call = self.jobs.export_contacts if kind == "contacts" else self.jobs.export_companies
        await self._start_once(f"export_{kind}", Export, user_id, lambda: call(user_id))

    async def send_burst(self, numbers: range) -> None:
        gate = asyncio.Semaphore(EMAIL_CONCURRENCY)

        async def one(n: int) -> None:
            async with gate:
                await self._call(
                    "send_email",
                    lambda: self.jobs.send_email(
                        send_address(n),
                        f"Chaos {n}",
                        f"<p>Message {n} of the chaos soak</p>",
                        f"Message {n} of the chaos soak",
                        idempotency_key=f"chaos-{self.seed}-{n}",
                    ),
                )

        await asyncio.gather(*(one(n) for n in numbers))

    async def sign_up(self, numbers: range) -> None:
        gate = asyncio.Semaphore(EMAIL_CONCURRENCY)

        async def one(n: int) -> None:
            async with gate:
                await self._call(
                    "join_waitlist", lambda: self.jobs.join_waitlist(waitlist_address(n))
                )

        await asyncio.gather(*(one(n) for n in numbers))

    async def run_phase(self, duration_s: float) -> None:
        """The faulted phase's workload, spread over its first part so the faults hit it."""
        w = self.workload
        tasks: list[Awaitable[None]] = []
        for importer in self.population.importers:
            tasks.append(
                self._at(
                    self.rng.uniform(0, 0.4) * duration_s,
                    self.start_import(importer, reference=False),
                )
            )
        bursts = w.email_bursts
        for burst in range(bursts):
            at_s = duration_s * 0.6 * burst / bursts + self.rng.uniform(0, 5)
            sends = range(w.send_emails * burst // bursts, w.send_emails * (burst + 1) // bursts)
            signups = range(
                w.waitlist_signups * burst // bursts, w.waitlist_signups * (burst + 1) // bursts
            )
            tasks.append(self._at(at_s, self.send_burst(sends)))
            tasks.append(self._at(at_s + 2, self.sign_up(signups)))
        synced = self.rng.sample(range(w.waitlist_signups), w.sync_contact_calls)
        tasks.append(self._at(duration_s * 0.7, self.sync_contacts(synced)))
        exporters = self.population.exporters
        for n in range(w.seeded_exports):
            exporter = exporters[n % len(exporters)]
            kind = "contacts" if n % 3 else "companies"
            at_s = duration_s * 0.85 * n / w.seeded_exports + self.rng.uniform(0, 3)
            tasks.append(self._at(at_s, self.export(exporter.user_id, kind)))
        await asyncio.gather(*tasks)

    async def sync_contacts(self, numbers: list[int]) -> None:
        for n in numbers:
            address = waitlist_address(n)
            await self._call("sync_contact", partial(self.jobs.sync_contact, address))

    @staticmethod
    async def _at(at_s: float, work: Awaitable[None]) -> None:
        await asyncio.sleep(at_s)
        await work

    # -- background duties until the end ---------------------------------------------------

    async def export_finished_imports(self) -> None:
        """Export each import user's contacts once its import completed (a stable count)."""
        ids = {importer.user_id for importer in self.population.importers}
        async with self.jobs.sessions() as session:
            done = await session.scalars(
                select(ContactImportJob.user_id).where(
                    ContactImportJob.user_id.in_(ids - self.exported_importers),
                    ContactImportJob.status == "completed",
                )
            )
            finished = set(done)
        for user_id in finished:
            await self.export(user_id, "contacts")
            self.exported_importers.add(user_id)

    async def tick_crons(self) -> None:
        """The compressed clock: run each hourly/daily cron again once its last run is done."""
        for route in CRON_ROUTES:
            previous = self._cron_jobs.get(route.name)
            if previous is not None:
                status = await Job(previous, self.jobs.redis).status()
                if status not in (JobStatus.complete, JobStatus.not_found):
                    continue
            self._cron_runs += 1
            job_id = f"chaos-cron:{route.name}:{self._cron_runs}"
            await self._enqueue_cron(route, job_id)
            self._cron_jobs[route.name] = job_id

    async def _enqueue_cron(self, route: Route, job_id: str) -> None:
        await enqueue(self.jobs.redis, route, job_id)

    async def duties(self, stop: asyncio.Event) -> None:
        last_cron_s = 0.0
        while not stop.is_set():
            try:
                await self.export_finished_imports()
                if time.monotonic() - last_cron_s >= self.workload.cron_every_s:
                    await self.tick_crons()
                    last_cron_s = time.monotonic()
            except Exception as exc:  # Redis or PostgreSQL down: the next round tries again
                self.call_errors[f"duties: {type(exc).__name__}"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)

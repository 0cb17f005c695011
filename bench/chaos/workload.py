"""The soak's workload and fault plan, in one place: what `make chaos` enqueues and breaks.

Everything here is plain data scaled by `--scale` and drawn from `--seed`, so the coordinator
can rerun the same soak after a merge by changing nothing but this file. Sizes at scale 1.0
are the issue's (#14): imports of 1,000 to 200,000 rows from several users, exports, 20,000
emails through the fake Resend, a marketing sync.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Source = Literal["local", "s3"]
FaultKind = Literal["worker_sigkill", "redis_restart", "pg_terminate_burst"]


@dataclass(frozen=True)
class ImportSpec:
    """One customer's import: `rows` generated rows (bench/make_contacts_csv.py, `seed`)."""

    label: str
    rows: int
    source: Source
    seed: int


@dataclass(frozen=True)
class ExportUserSpec:
    """A customer whose contacts are seeded by SQL before the soak and exported repeatedly."""

    label: str
    contacts: int
    companies: int


# Rows at scale 1.0; every import is at least 1,000 rows whatever the scale (the floor
# at full scale; at small scales the smallest files stay a few batches long).
IMPORT_ROWS = (200_000, 60_000, 20_000, 5_000, 1_000)
IMPORT_SOURCES: tuple[Source, ...] = ("s3", "local", "local", "s3", "local")
EXPORT_USERS = (("exporter-a", 100_000, 500), ("exporter-b", 10_000, 40))
SEND_EMAILS = 15_000  # `send_email` with the caller's own idempotency key, in bursts
WAITLIST_SIGNUPS = 5_000  # `join_waitlist` (no confirmation): step 1 of the campaign each
SYNC_CONTACT_CALLS = 100  # `sync_contact(email)` of waitlist addresses
MIN_IMPORT_ROWS = 1_000


@dataclass(frozen=True)
class Workload:
    imports: tuple[ImportSpec, ...]
    export_users: tuple[ExportUserSpec, ...]
    send_emails: int
    waitlist_signups: int
    sync_contact_calls: int
    # Exports of the seeded users enqueued during the fault phase (contacts and companies
    # alternate); each import user is also exported once its import completes.
    seeded_exports: int
    email_bursts: int
    # The driver stands in for arq's clock: the hourly campaign and daily marketing sync run
    # every `cron_every_s` instead (never two runs of one at once, as their crons assume).
    cron_every_s: float = 60.0

    @property
    def emails(self) -> int:
        return self.send_emails + self.waitlist_signups


def build_workload(scale: float, seed: int) -> Workload:
    rng = random.Random(seed)
    imports = tuple(
        ImportSpec(
            label=f"importer-{index}",
            rows=max(MIN_IMPORT_ROWS, round(rows * scale)),
            source=source,
            seed=rng.randrange(1 << 30),
        )
        for index, (rows, source) in enumerate(zip(IMPORT_ROWS, IMPORT_SOURCES, strict=True))
    )
    export_users = tuple(
        ExportUserSpec(label, max(100, round(contacts * scale)), max(5, round(companies * scale)))
        for label, contacts, companies in EXPORT_USERS
    )
    return Workload(
        imports=imports,
        export_users=export_users,
        send_emails=max(100, round(SEND_EMAILS * scale)),
        waitlist_signups=max(50, round(WAITLIST_SIGNUPS * scale)),
        sync_contact_calls=max(10, round(SYNC_CONTACT_CALLS * scale)),
        seeded_exports=18,
        email_bursts=10,
    )


@dataclass(frozen=True)
class Fault:
    at_s: float  # seconds after the fault phase started
    kind: FaultKind


# A worker SIGKILL every 20-60 s; one Redis restart (kill -9, started again empty) in the first
# half, so the reconciler (MIN_AGE_S 60, every minute) has time to repair it before the end;
# pg_terminate_backend bursts (PG_BURST_ROUNDS rounds, PG_BURST_GAP_S apart) every 30-70 s.
KILL_EVERY_S = (20.0, 60.0)
PG_BURST_EVERY_S = (30.0, 70.0)
PG_BURST_ROUNDS = 3
PG_BURST_GAP_S = 0.5
REDIS_RESTART_WITHIN = (0.2, 0.45)  # fraction of the fault phase
REDIS_DOWN_S = 3.0


def plan_faults(duration_s: float, seed: int) -> tuple[Fault, ...]:
    rng = random.Random(seed ^ 0x5EED)
    faults: list[Fault] = []
    at_s = rng.uniform(*KILL_EVERY_S) / 2  # the first kill comes sooner: imports are short
    while at_s < duration_s:
        faults.append(Fault(at_s, "worker_sigkill"))
        at_s += rng.uniform(*KILL_EVERY_S)
    at_s = rng.uniform(*PG_BURST_EVERY_S) / 2
    while at_s < duration_s:
        faults.append(Fault(at_s, "pg_terminate_burst"))
        at_s += rng.uniform(*PG_BURST_EVERY_S)
    faults.append(Fault(duration_s * rng.uniform(*REDIS_RESTART_WITHIN), "redis_restart"))
    return tuple(sorted(faults, key=lambda fault: fault.at_s))

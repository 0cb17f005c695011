"""The soak's users and input data: customers, their CSV files, and seeded contacts to export.

Each import user has a twin, its reference user, who imports the same file after the faults
stop: its contacts are the fault-free result the faulted import must equal. Files come from
bench/make_contacts_csv.py (messy on purpose: invalid and repeated emails), written in a
thread; S3 sources go to moto under `uploads/<user_id>/` as the client requires.
"""

from __future__ import annotations

import asyncio
import csv
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.chaos.env import BUCKET, Environment
from bench.chaos.workload import ExportUserSpec, ImportSpec, Workload
from bench.make_contacts_csv import HEADER, _blocks


@dataclass(frozen=True)
class ImportUser:
    spec: ImportSpec
    user_id: uuid.UUID
    reference_id: uuid.UUID

    def path_for(self, user_id: uuid.UUID) -> str:
        """What the web app passes to `import_contacts` for `user_id` (this user or its twin)."""
        name = f"{self.spec.label}.csv"
        if self.spec.source == "s3":
            return f"s3://{BUCKET}/uploads/{user_id}/{name}"
        return name  # relative: inside IMPORT_DIR/<user_id>/


@dataclass(frozen=True)
class ExportUser:
    spec: ExportUserSpec
    user_id: uuid.UUID


@dataclass(frozen=True)
class Population:
    importers: tuple[ImportUser, ...]
    exporters: tuple[ExportUser, ...]

    def user_emails(self) -> list[str]:
        emails = [f"{u.spec.label}@chaos.test" for u in self.importers]
        emails += [f"{u.spec.label}-reference@chaos.test" for u in self.importers]
        return emails + [f"{u.spec.label}@chaos.test" for u in self.exporters]


def _write_csv(path: Path, rows: int, seed: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(HEADER)
        for block in _blocks(rows, seed):
            writer.writerows(block)


SEED_COMPANIES = """
INSERT INTO companies (id, user_id, name, domain)
SELECT gen_random_uuid(), $1, 'Company ' || n, 'company' || n || '.example'
FROM generate_series(1, $2::int) AS n
"""
SEED_CONTACTS = """
WITH numbered AS (
    SELECT id, row_number() OVER (ORDER BY name) AS n FROM companies WHERE user_id = $1
)
INSERT INTO contacts (user_id, email, first_name, last_name, company_id, city, tags)
SELECT $1, 'seed' || g.n || '@' || $3 || '.example', 'First' || g.n, 'Last' || g.n,
       numbered.id, 'Berlin', ARRAY['seed']
FROM generate_series(1, $2::int) AS g(n) JOIN numbered ON numbered.n = 1 + g.n % $4
"""


async def populate(env: Environment, workload: Workload) -> Population:
    importers = tuple(ImportUser(spec, uuid.uuid4(), uuid.uuid4()) for spec in workload.imports)
    exporters = tuple(ExportUser(spec, uuid.uuid4()) for spec in workload.export_users)
    population = Population(importers, exporters)
    connection = await asyncpg.connect(env.dsn)
    try:
        users = [(u.user_id, f"{u.spec.label}@chaos.test") for u in importers]
        users += [(u.reference_id, f"{u.spec.label}-reference@chaos.test") for u in importers]
        users += [(u.user_id, f"{u.spec.label}@chaos.test") for u in exporters]
        await connection.executemany("INSERT INTO users (id, email) VALUES ($1, $2)", users)
        for exporter in exporters:
            await connection.execute(SEED_COMPANIES, exporter.user_id, exporter.spec.companies)
            await connection.execute(
                SEED_CONTACTS,
                exporter.user_id,
                exporter.spec.contacts,
                exporter.spec.label,
                exporter.spec.companies,
            )
    finally:
        await connection.close()
    staging = env.base_dir / "staging"
    staging.mkdir(exist_ok=True)
    s3 = env.moto.client()
    for importer in importers:
        source = staging / f"{importer.spec.label}.csv"
        await asyncio.to_thread(_write_csv, source, importer.spec.rows, importer.spec.seed)
        for user_id in (importer.user_id, importer.reference_id):
            if importer.spec.source == "s3":
                key = f"uploads/{user_id}/{importer.spec.label}.csv"
                await asyncio.to_thread(s3.upload_file, str(source), BUCKET, key)
            else:
                home = env.import_dir / str(user_id)
                home.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(shutil.copyfile, source, home / source.name)
        source.unlink()
    return population

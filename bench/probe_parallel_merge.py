"""EXPERIMENTAL probe (branch `parallel-merge`): does splitting each batch's merge by email hash
across N PostgreSQL connections make it faster?

    python bench/probe_parallel_merge.py [--rows 300000] [--parts 1,2,1,2]

The job's own `collapse` + `merge_part` on 5,000-row batches, no job row, no checkpoint:
companies first in one transaction, then each part in its own concurrent transaction. Prints
wall time, the backends' CPU seconds (from /proc, so run it on the database host) and how much
of the machine stayed idle: a second part only helps when there is an idle core to use.
Uses (and drops) a database of its own, `c360_parmerge_probe`, on BENCH_PG_SERVER.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
import zlib
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import make_contacts_csv
from bench.import_baselines import valid_batches
from db.migrate import upgrade
from jobs.imports.merge import PreparedPart, collapse, merge_part, upsert_companies
from jobs.imports.staging_copy import copy_text
from jobs.imports.validate import ContactRow
from worker.settings import Settings

PG_SERVER = os.environ.get("BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
DATABASE = "c360_parmerge_probe"
TICK = os.sysconf("SC_CLK_TCK")


Batch = tuple[list[str], list[ContactRow]]  # companies, contacts with duplicates collapsed


def split(contacts: list[ContactRow], parts: int) -> list[PreparedPart]:
    shares: list[list[ContactRow]] = [[] for _ in range(parts)]
    for contact in contacts:
        shares[zlib.crc32(contact.email.encode()) % parts].append(contact)
    return [PreparedPart(len(share), len(share), copy_text(share), []) for share in shares]


async def merge_all(
    conns: list[asyncpg.Connection], user: uuid.UUID, batches: list[Batch], parts: int
) -> None:
    async def one(connection: asyncpg.Connection, part: PreparedPart) -> None:
        async with connection.transaction():
            await merge_part(connection, user, uuid.uuid4(), part, 0)

    for companies, contacts in batches:
        async with conns[0].transaction():
            await upsert_companies(conns[0], user, companies)
        shares = split(contacts, parts)
        await asyncio.gather(*(one(c, p) for c, p in zip(conns, shares, strict=False)))


def backend_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def machine_idle_s() -> float:
    return int(Path("/proc/stat").read_text().split("\n", 1)[0].split()[4]) / TICK


async def main_async(path: Path, rows: int, plan: list[int]) -> None:
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await upgrade(Settings(database_url=f"{PG_SERVER}/{DATABASE}").database)
    conns = [await asyncpg.connect(f"{PG_SERVER}/{DATABASE}") for _ in range(max(plan))]
    try:
        user = uuid.uuid4()
        await conns[0].execute("INSERT INTO users (id, email) VALUES ($1, 'p@x.io')", user)
        batches = [
            (list(dict.fromkeys(r.company for r in valid if r.company)), collapse(valid))
            async for _, valid in valid_batches(path, 5000)
        ]
        pids = [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
        for parts in plan:
            await conns[0].execute("TRUNCATE contacts, companies CASCADE")
            cpu0, idle0, started_s = backend_cpu_s(pids), machine_idle_s(), time.perf_counter()
            await merge_all(conns, user, batches, parts)
            seconds = time.perf_counter() - started_s
            print(
                f"parts={parts}: {seconds:.2f} s, {rows / seconds:,.0f} rows/s, backend CPU "
                f"{backend_cpu_s(pids) - cpu0:.2f} s, "
                f"machine idle {machine_idle_s() - idle0:.2f} s",
                flush=True,
            )
    finally:
        for connection in conns:
            await connection.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--parts", default="1,2,1,2")
    args = parser.parse_args()
    path = Path(f"/tmp/c360-probe-{args.rows}.csv")
    if not path.exists():
        make_contacts_csv.main([str(path), "--rows", str(args.rows)])
    asyncio.run(main_async(path, args.rows, [int(p) for p in args.parts.split(",")]))


if __name__ == "__main__":
    main()

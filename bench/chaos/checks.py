"""The invariants, read from PostgreSQL, Redis, the fake providers, moto and the disk.

Each check is one table row: what was measured, its value, and whether it must be zero (a
loss, a duplication, something left behind) or is context. The soak fails when any must-be-zero
row is not zero, or when the import, export or email totals are short of the workload.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from arq.constants import in_progress_key_prefix

from bench.chaos.data import Population
from bench.chaos.driver import send_address, waitlist_address
from bench.chaos.env import BUCKET, Environment
from bench.chaos.workload import Workload
from tests.support.provider_server import RESEND_BATCH, RESEND_EMAILS
from worker.routes import ROUTES

QUEUES = ("imports", "exports", "default")
# One email per delivery on either path: the fake records each email of a batch on its own.
RESEND_PATHS = (RESEND_EMAILS, RESEND_BATCH)
CRON_NAMES = frozenset(route.name for route in ROUTES if route.cron)
# The ids `open_work` last found in progress, printed when the soak does not quiesce.
RUNNING_SEEN: set[str] = set()

# The contacts of one user as the rows an import is judged by: every column the import writes,
# the company by name (its id differs between users), in one order.
CONTACTS_MD5 = """
SELECT count(*), md5(coalesce(string_agg(
    concat_ws('|', c.email, c.first_name, c.last_name, c.phone, co.name, co.domain, c.job_title,
              c.city, c.country, c.linkedin_url, array_to_string(c.tags, ';')),
    E'\\n' ORDER BY c.email), ''))
FROM contacts c LEFT JOIN companies co ON co.id = c.company_id
WHERE c.user_id = $1
"""
ERRORS_MD5 = """
SELECT md5(coalesce(string_agg(concat_ws('|', e.row_number, e.message, e.payload::text),
                               E'\\n' ORDER BY e.row_number), ''))
FROM contact_import_errors e JOIN contact_import_jobs j ON j.id = e.job_id
WHERE j.user_id = $1
"""
IMPORT_ROW = """
SELECT count(*) AS imports, min(status) AS status, min(total_rows) AS total_rows,
       min(processed_rows) AS processed, min(created_count) AS created,
       min(updated_count) AS updated, min(error_count) AS errors, min(message) AS message
FROM contact_import_jobs WHERE user_id = $1
"""


@dataclass(frozen=True)
class Row:
    section: str
    what: str
    value: int
    must_be_zero: bool = False

    @property
    def ok(self) -> bool:
        return not self.must_be_zero or self.value == 0


async def _import_fingerprint(connection: asyncpg.Connection, user_id: Any) -> tuple[Any, ...]:
    counters = await connection.fetchrow(IMPORT_ROW, user_id)
    contacts = await connection.fetchrow(CONTACTS_MD5, user_id)
    assert counters is not None and contacts is not None  # aggregates always answer a row
    errors = await connection.fetchval(ERRORS_MD5, user_id)
    return (*counters.values(), *contacts.values(), errors)


async def check_imports(connection: asyncpg.Connection, population: Population) -> list[Row]:
    matched = mismatched = not_completed = 0
    rows = 0
    for importer in population.importers:
        ours = await _import_fingerprint(connection, importer.user_id)
        reference = await _import_fingerprint(connection, importer.reference_id)
        completed = ours[0] == 1 and ours[1] == "completed" and reference[1] == "completed"
        if not completed:
            not_completed += 1
            print(f"  import {importer.spec.label}: ours {ours[:2]}, reference {reference[:2]}")
        elif ours == reference:
            matched += 1
            rows += importer.spec.rows
        else:
            mismatched += 1
            print(f"  import {importer.spec.label} differs:\n    ours {ours}\n    ref  {reference}")
    return [
        Row(
            "imports",
            "imports equal to their fault-free reference (counts, rows md5, errors md5)",
            matched,
        ),
        Row("imports", "rows in those imports", rows),
        Row("imports", "imports different from the reference", mismatched, must_be_zero=True),
        Row("imports", "imports not completed", not_completed, must_be_zero=True),
    ]


def _s3_body(s3: Any, key: str) -> bytes:
    body: bytes = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return body


def _csv_rows(body: bytes) -> int:
    return sum(1 for _ in csv.reader(io.StringIO(body.decode("utf-8")))) - 1


async def check_exports(connection: asyncpg.Connection, env: Environment) -> list[Row]:
    exports = await connection.fetch(
        """SELECT e.id, e.kind, e.status, e.row_count, e.file_path,
                  CASE e.kind WHEN 'contacts'
                       THEN (SELECT count(*) FROM contacts c WHERE c.user_id = e.user_id)
                       ELSE (SELECT count(*) FROM companies c WHERE c.user_id = e.user_id) END
                  AS expected
           FROM exports e"""
    )
    s3 = env.moto.client()
    right = wrong_count = not_completed = bad_file = 0
    for export in exports:
        if export["status"] != "completed":
            not_completed += 1
            continue
        if export["row_count"] != export["expected"]:
            wrong_count += 1
            continue
        path: str = export["file_path"]
        try:
            if path.startswith("s3://"):
                key = path.removeprefix(f"s3://{BUCKET}/")
                body = await asyncio.to_thread(_s3_body, s3, key)
            else:
                body = await asyncio.to_thread(Path(path).read_bytes)
        except Exception:
            bad_file += 1
            continue
        if await asyncio.to_thread(_csv_rows, body) != export["expected"]:
            bad_file += 1
        else:
            right += 1
    return [
        Row("exports", "exports completed with the right row count (in the file too)", right),
        Row("exports", "exports with a wrong row count", wrong_count, must_be_zero=True),
        Row(
            "exports",
            "exports whose file is missing or has other rows",
            bad_file,
            must_be_zero=True,
        ),
        Row("exports", "exports not completed", not_completed, must_be_zero=True),
    ]


def expected_recipients(workload: Workload) -> set[str]:
    return {send_address(n) for n in range(workload.send_emails)} | {
        waitlist_address(n) for n in range(workload.waitlist_signups)
    }


def delivered_recipients(env: Environment) -> Counter[str]:
    return Counter(
        recipient.lower()
        for delivery in env.provider.delivered
        if delivery.path in RESEND_PATHS
        for recipient in delivery.json["to"]
    )


async def check_emails(
    connection: asyncpg.Connection, env: Environment, workload: Workload
) -> list[Row]:
    expected = expected_recipients(workload)
    delivered = delivered_recipients(env)
    keys = Counter(
        request.headers.get("Idempotency-Key")
        for path in RESEND_PATHS
        for request in env.provider.requests_to(path)
    )
    open_rows = await connection.fetchval(
        "SELECT count(*) FROM email_messages WHERE status <> 'sent'"
    )
    return [
        Row("emails", "emails expected (send_email + waitlist step 1)", len(expected)),
        Row("emails", "delivered exactly once", sum(1 for r in expected if delivered[r] == 1)),
        Row(
            "emails",
            "missing (never delivered)",
            sum(1 for r in expected if delivered[r] == 0),
            True,
        ),
        Row(
            "emails",
            "duplicated (delivered more than once)",
            sum(1 for r in delivered if delivered[r] > 1),
            True,
        ),
        Row(
            "emails",
            "delivered to an address nobody asked for",
            len(set(delivered) - expected),
            True,
        ),
        Row("emails", "outbox rows not `sent`", open_rows, must_be_zero=True),
        Row(
            "emails",
            "Resend requests repeating a key (answered from its first send)",
            sum(n - 1 for n in keys.values()),
        ),
    ]


def expected_marketing(population: Population, workload: Workload) -> set[str]:
    return {e.lower() for e in population.user_emails()} | {
        waitlist_address(n) for n in range(workload.waitlist_signups)
    }


def check_marketing(env: Environment, population: Population, workload: Workload) -> list[Row]:
    expected = expected_marketing(population, workload)
    contacts = env.provider.marketing_contacts
    return [
        Row("marketing", "contacts expected in SendGrid (users + waitlist)", len(expected)),
        Row("marketing", "missing from SendGrid", len(expected - set(contacts)), must_be_zero=True),
        Row(
            "marketing",
            "in SendGrid but not ours (customers' contacts must never go)",
            len(set(contacts) - expected),
            True,
        ),
    ]


async def open_work(connection: asyncpg.Connection, redis: aioredis.Redis) -> dict[str, int]:
    """What is still to do: open rows in PostgreSQL, due or running jobs in Redis."""
    counts = {
        "imports pending or processing": await connection.fetchval(
            "SELECT count(*) FROM contact_import_jobs WHERE status IN ('pending', 'processing')"
        ),
        "exports pending or processing": await connection.fetchval(
            "SELECT count(*) FROM exports WHERE status IN ('pending', 'processing')"
        ),
        "outbox rows pending or sending": await connection.fetchval(
            "SELECT count(*) FROM email_messages WHERE status IN ('pending', 'sending')"
        ),
    }
    server_ms = int((await redis.time())[0]) * 1000
    queued = 0
    for queue in QUEUES:
        queued += await redis.zcount(queue, 0, server_ms)
    counts["jobs queued and due in Redis"] = queued
    running = 0
    RUNNING_SEEN.clear()
    async for key in redis.scan_iter(match=in_progress_key_prefix + "*", count=1000):
        job_id = key.decode().removeprefix(in_progress_key_prefix)
        # arq keeps the key of a finished cron function's job 60 s (worker/lease.py), the
        # driver's own ticks (`chaos-cron:<name>:<n>`) included: not work in progress.
        if not CRON_NAMES & set(job_id.split(":")):
            running += 1
            RUNNING_SEEN.add(job_id)
    counts["jobs in progress in Redis"] = running
    return counts


# Logged by jobs/exports/job.py when a re-run cleans up after a killed writer of its key.
DISCARDED = re.compile(r"removed (\d+) partial file\(s\) of killed runs")


def discarded_by_reruns(env: Environment) -> int:
    """Partial files or uploads of killed export runs that their re-run removed (worker logs)."""
    return sum(
        int(match.group(1))
        for log in env.log_dir.glob("*.log")
        for match in DISCARDED.finditer(log.read_text(errors="replace"))
    )


def leftovers(env: Environment) -> dict[str, int]:
    temporary = [
        path
        for root in (env.import_dir, env.export_dir, env.worker_tmp)
        for path in root.rglob("*")
        if path.is_file() and (path.name.endswith(".tmp") or root == env.worker_tmp)
    ]
    uploads = env.moto.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    for path in temporary:
        print(f"  left: {path}")
    for upload in uploads:
        print(f"  open multipart upload: {upload['Key']} ({upload['UploadId'][:12]}...)")
    return {"temporary files left": len(temporary), "open multipart uploads left": len(uploads)}

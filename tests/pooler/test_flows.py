"""The import, export and email flows end to end with every statement going through PgBouncer
in transaction mode: the client's and the burst workers' (DATABASE_POOLER=pgbouncer).

The checks read PostgreSQL directly (the root conftest's `sessions`), so what they see is
what was committed, not what the pooled connections say.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.exports.factories import Rows, parse_csv
from tests.imports.conftest import contacts, counts, start_import
from tests.imports.test_job_runs import oracle, sample_csv
from tests.support.provider_server import ProviderServer
from worker.client import JobsClient
from worker.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


async def test_an_import_through_the_pooler_ends_as_the_oracle_says(
    pooled_settings: Settings,
    pooled_client: JobsClient,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    user = await Rows(sessions).user()
    data = sample_csv(120)
    # Small batches: many batch transactions, each on whichever server connection is free.
    small = pooled_settings.model_copy(update={"import_batch_rows": 9})
    import_id = await start_import(pooled_client, user, data)
    worker = await run_burst("imports", settings_=small)
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (1, 0, 0)
    (created, updated, errors), rows = oracle(data)
    status = await pooled_client.import_status(import_id)
    assert counts(status) == ("completed", 120, 120, created, updated, errors)
    found = [
        {k: row[k] for k in ("email", "first_name", "company", "city")}
        for row in await contacts(sessions, user)
    ]
    assert found == rows
    async with sessions() as session:
        lease = (
            await session.execute(
                text("SELECT lease_owner, lease_expires_at FROM contact_import_jobs")
            )
        ).one()
    assert tuple(lease) == (None, None)  # given up with the final state


async def test_exports_through_the_pooler_write_every_row(
    settings: Settings,
    pooled_settings: Settings,
    pooled_client: JobsClient,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    rows = Rows(sessions)
    user = await rows.user()
    await rows.many_contacts(user, 500)
    picked = [await rows.contact(user, f"picked{i}@example.com") for i in range(3)]
    everything = await pooled_client.export_contacts(user)
    selection = await pooled_client.export_contacts(user, picked)  # COPY into export_items
    companies = await pooled_client.export_companies(user)
    # All three at once on a pool of 3 server connections (the deadlock this test caught
    # needs them concurrent): one user's exports would otherwise take turns (fair sharing).
    side_by_side = pooled_settings.model_copy(update={"export_max_running_per_user": 3})
    worker = await run_burst("exports", settings_=side_by_side)
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (3, 0, 0)
    expected = {everything.id: 503, selection.id: 3, companies.id: 0}
    written: dict[uuid.UUID, list[list[str]]] = {}
    for export_id, row_count in expected.items():
        status = await pooled_client.export_status(export_id)
        assert (status.status, status.row_count) == ("completed", row_count)
        path = settings.export_dir.resolve() / str(user) / f"{export_id}.csv"
        _header, *written[export_id] = parse_csv(path.read_bytes())
        assert len(written[export_id]) == row_count
    assert sorted(record[1] for record in written[selection.id]) == [
        f"picked{i}@example.com" for i in range(3)
    ]


async def test_emails_through_the_pooler_are_sent_once_each(
    pooled_settings: Settings,
    pooled_client: JobsClient,
    sessions: Sessions,
    run_burst: RunBurst,
) -> None:
    with ProviderServer() as provider:
        provider.default_delay_s = 0.05  # many sends in flight at once: more clients than servers
        email_settings = pooled_settings.model_copy(
            update={
                "email_provider": "resend",
                "email_api_key": SecretStr("re_test_pooled_key_0123456789"),
                "email_api_base_url": provider.base_url,
                "email_rate_limit_per_s": 1000.0,
            }
        )
        client = JobsClient(
            redis=pooled_client.redis, sessions=pooled_client.sessions, settings=email_settings
        )
        sent: list[Any] = []
        for n in range(40):
            sent.append(
                await client.send_email(
                    f"user{n}@example.com", f"Hello {n}", "<p>hi</p>", idempotency_key=f"k{n}"
                )
            )
        # The same key again: one email, one delivery.
        await client.send_email("user0@example.com", "Hello 0", "<p>hi</p>", idempotency_key="k0")
        worker = await run_burst("default", settings_=email_settings)
        assert worker.jobs_failed == 0
        delivered = sorted(d.json["to"][0] for d in provider.delivered)
    assert delivered == sorted(f"user{n}@example.com" for n in range(40))
    async with sessions() as session:
        outbox = (
            await session.execute(text("SELECT status, count(*) FROM email_messages GROUP BY 1"))
        ).all()
    assert [tuple(row) for row in outbox] == [("sent", 40)]

"""Marketing sync: only our own people, batches split at the limit, resumable, `none` is silent."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
from arq.connections import ArqRedis
from pydantic import SecretStr
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import JobCheckpoint
from jobs.marketing.sync import SyncAllResult, SyncContactResult, sync_all_contacts, sync_contact
from tests.conftest import RunBurst
from tests.support.provider_server import (
    SENDGRID_CONTACTS,
    SENDGRID_CONTACTS_SEARCH,
    Answer,
    ProviderServer,
    RecordedRequest,
)
from tests.support.result_shapes import assert_shape
from worker.context import Ctx
from worker.errors import TransientError
from worker.marketing import MAX_CONTACTS_PER_CALL, SendGridMarketing
from worker.settings import Settings

from .conftest import API_KEY

BuildCtx = Callable[..., Awaitable[Ctx]]


async def seed(sessions: async_sessionmaker[AsyncSession], users: int, waitlist: int) -> None:
    """Users, waitlist entries and one customer-imported contact that must never be synced."""
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO users (id, email, name) SELECT gen_random_uuid(), "
                "'user' || i || '@example.com', 'Ulla Maria User' FROM generate_series(1, :n) i"
            ),
            {"n": users},
        )
        await session.execute(
            text(
                "INSERT INTO waitlist_entries (email, name) SELECT 'wait' || i || '@example.com', "
                "NULL FROM generate_series(1, :n) i"
            ),
            {"n": waitlist},
        )
        owner = await session.scalar(text("SELECT id FROM users ORDER BY id LIMIT 1"))
        await session.execute(
            text("INSERT INTO contacts (user_id, email) VALUES (:u, 'customer-lead@acme.test')"),
            {"u": owner},
        )


def synced_emails(server: ProviderServer) -> list[str]:
    return [c["email"] for d in server.delivered for c in d.json["contacts"]]


def marketing(job_settings: Callable[..., Settings]) -> Settings:
    return job_settings("console", marketing_provider="sendgrid")


async def test_daily_sync_splits_at_30000_and_never_sends_customer_contacts(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await seed(sessions, users=MAX_CONTACTS_PER_CALL + 1, waitlist=2)
    await arq_redis.enqueue_job("sync_all_contacts", _queue_name="default")
    await run_burst("default", settings_=marketing(job_settings))

    requests = provider_server.requests_to(SENDGRID_CONTACTS)
    assert [r.method for r in requests] == ["PUT"] * 3
    assert [len(r.json["contacts"]) for r in requests] == [2, MAX_CONTACTS_PER_CALL, 1]
    assert requests[0].headers["Authorization"] == f"Bearer {API_KEY}"
    assert requests[1].json["contacts"][0] == {
        "email": requests[1].json["contacts"][0]["email"],
        "first_name": "Ulla",
        "last_name": "Maria User",
    }
    emails = synced_emails(provider_server)
    assert len(emails) == len(set(emails)) == MAX_CONTACTS_PER_CALL + 3
    assert "customer-lead@acme.test" not in emails
    async with sessions() as session:
        checkpoint = await session.get(JobCheckpoint, "sync_all_contacts")
    assert checkpoint is not None and checkpoint.value["done"] is True


async def test_a_failed_sync_resumes_from_the_last_accepted_batch(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await seed(sessions, users=5, waitlist=3)
    ctx = await job_ctx("console", marketing_provider="sendgrid")
    ctx["marketing_provider"] = SendGridMarketing(
        http=ctx["http"],
        api_key=SecretStr(API_KEY),
        base_url=provider_server.base_url,
        max_contacts_per_call=2,
    )
    # Batches: waitlist [2, 1], users [2, 2, 1]. The third call fails.
    provider_server.script(SENDGRID_CONTACTS, Answer(status=202), Answer(status=202))
    provider_server.script(SENDGRID_CONTACTS, Answer(status=500))
    with pytest.raises(TransientError):
        await sync_all_contacts.coroutine(ctx)

    first = await sync_all_contacts.coroutine(ctx)  # the retry
    second = await sync_all_contacts.coroutine(ctx)  # the next day: from the start again
    assert_shape(first, SyncAllResult)
    assert_shape(second, SyncAllResult)

    sizes = [len(r.json["contacts"]) for r in provider_server.requests_to(SENDGRID_CONTACTS)]
    # Failed run and its retry: waitlist 2, 1, users 2, (500), 2, 2, 1. Then the next day.
    assert (sizes[:6], sizes[6:]) == ([2, 1, 2, 2, 2, 1], [2, 1, 2, 2, 1])
    assert (first["resumed"], first["batches"], first["synced"]) == (True, 3, 8)
    assert (second["resumed"], second["batches"], second["synced"]) == (False, 5, 8)


async def test_sync_contact_only_syncs_platform_people(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await seed(sessions, users=1, waitlist=1)
    for email in ("USER1@example.com", "wait1@example.com", "customer-lead@acme.test"):
        await arq_redis.enqueue_job("sync_contact", _queue_name="default", email=email)
    await run_burst("default", settings_=marketing(job_settings))

    assert sorted(synced_emails(provider_server)) == ["user1@example.com", "wait1@example.com"]


async def test_marketing_none_logs_and_does_nothing(
    caplog: pytest.LogCaptureFixture,
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await seed(sessions, users=3, waitlist=1)
    ctx = await job_ctx("console")  # MARKETING_PROVIDER defaults to none
    caplog.set_level(logging.INFO)
    results: list[SyncAllResult | SyncContactResult] = [
        await sync_all_contacts.coroutine(ctx),
        await sync_contact.coroutine(ctx, email="user1@example.com"),
    ]
    assert [r["synced"] for r in results] == [0, 0]
    assert provider_server.requests == []
    assert caplog.text.count("MARKETING_PROVIDER=none") == 2
    async with sessions() as session:
        assert (await session.execute(select(JobCheckpoint))).first() is None


async def unsubscribe(sessions: async_sessionmaker[AsyncSession], email: str) -> None:
    """What the campaign's unsubscribe link does to the entry."""
    async with sessions.begin() as session:
        await session.execute(
            text("UPDATE waitlist_entries SET unsubscribed_at = now() WHERE lower(email) = :e"),
            {"e": email},
        )


def pushed(requests: list[RecordedRequest]) -> set[str]:
    """Every address the PUTs among `requests` carried."""
    return {c["email"] for r in requests if r.method == "PUT" for c in r.json["contacts"]}


def deleted_ids(server: ProviderServer) -> list[str]:
    deletes = [r for r in server.requests_to(SENDGRID_CONTACTS) if r.method == "DELETE"]
    return [i for r in deletes for i in r.query["ids"].split(",")]


async def test_unsubscribed_entries_are_never_pushed_and_earlier_pushes_are_removed(
    job_ctx: BuildCtx,
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO waitlist_entries (email, name, unsubscribed_at) VALUES "
                "('stay@example.com', 'Stay', NULL), ('leave@example.com', 'Leave', NULL), "
                "('Gone@Example.com', 'Gone', now() - interval '30 days')"
            )
        )
        # The same address signed up as a user later: its unsubscribe still holds.
        await session.execute(
            text("INSERT INTO users (id, email) VALUES (gen_random_uuid(), 'gone@example.com')")
        )
    ctx = await job_ctx("console", marketing_provider="sendgrid")

    await sync_all_contacts.coroutine(ctx)  # day 1
    day_1 = provider_server.requests_to(SENDGRID_CONTACTS)
    assert pushed(day_1) == {"stay@example.com", "leave@example.com"}
    leave_id = provider_server.marketing_contacts["leave@example.com"]

    await unsubscribe(sessions, "leave@example.com")  # clicks the link in step 2
    day_2 = await sync_all_contacts.coroutine(ctx)

    assert pushed(provider_server.requests_to(SENDGRID_CONTACTS)[len(day_1) :]) == {
        "stay@example.com"
    }
    assert deleted_ids(provider_server) == [leave_id]
    assert set(provider_server.marketing_contacts) == {"stay@example.com"}
    assert day_2["removed"] == 1
    # Every search asked only about addresses that unsubscribed, never about the others.
    searched = {
        e for r in provider_server.requests_to(SENDGRID_CONTACTS_SEARCH) for e in r.json["emails"]
    }
    assert searched == {"gone@example.com", "leave@example.com"}

    after_day_2 = len(provider_server.requests_to(SENDGRID_CONTACTS))
    await sync_all_contacts.coroutine(ctx)  # day 3: nothing new to remove, nothing re-pushed
    day_3 = provider_server.requests_to(SENDGRID_CONTACTS)[after_day_2:]
    assert pushed(day_3) == {"stay@example.com"}
    assert deleted_ids(provider_server) == [leave_id]


async def test_sync_contact_of_an_unsubscribed_address_removes_it_at_once(
    job_ctx: BuildCtx,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions.begin() as session:
        await session.execute(
            text(
                "INSERT INTO waitlist_entries (email, name) VALUES ('stay@example.com', 'Stay'), "
                "('quick@example.com', 'Quick')"
            )
        )
    await sync_all_contacts.coroutine(await job_ctx("console", marketing_provider="sendgrid"))
    quick_id = provider_server.marketing_contacts["quick@example.com"]
    puts = len(provider_server.requests_to(SENDGRID_CONTACTS))

    # The web app records the unsubscribe, then asks for a sync of that address.
    await unsubscribe(sessions, "quick@example.com")
    await arq_redis.enqueue_job("sync_contact", _queue_name="default", email="Quick@Example.com")
    await run_burst("default", settings_=marketing(job_settings))

    assert set(provider_server.marketing_contacts) == {"stay@example.com"}
    assert deleted_ids(provider_server) == [quick_id]
    assert pushed(provider_server.requests_to(SENDGRID_CONTACTS)[puts:]) == set()

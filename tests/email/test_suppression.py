"""The suppression list: what it stops at the outbox claim, how entries change, the CLI."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from db.models import SUPPRESSION_REASONS, EmailSuppression, WaitlistEntry
from jobs.email.suppression import Reason, is_campaign, suppress
from tests.conftest import RunBurst
from tests.exports.test_export_cli import cli_env, finish
from tests.support.provider_server import ProviderServer
from tests.webhooks.signing import RESEND_SECRET, resend_bounce, svix_headers
from worker.client import JobsClient
from worker.settings import Settings
from worker.web.webhooks import webhook_routes

from .conftest import outbox_rows

Sessions = async_sessionmaker[AsyncSession]
ROOT = Path(__file__).resolve().parents[2]


async def add(sessions: Sessions, email: str, reason: Reason, source: str = "test") -> None:
    async with sessions.begin() as session:
        await suppress(session, email, reason, source)


async def entries(sessions: Sessions) -> list[tuple[str, str, str]]:
    async with sessions() as session:
        rows = await session.scalars(select(EmailSuppression).order_by(EmailSuppression.email))
        return [(r.email, r.reason, r.source) for r in rows]


def test_reasons_are_one_list_and_only_waitlist_keys_are_campaign_email() -> None:
    assert get_args(Reason) == SUPPRESSION_REASONS
    assert is_campaign(f"waitlist/{uuid.uuid4()}/2")
    for key in (f"welcome/{uuid.uuid4()}", "trial-reminder/x", "trial-expired/x", "job/1"):
        assert not is_campaign(key), key
    # A caller cannot make its email campaign (or escape suppression) by choosing a key.
    assert not is_campaign("caller/waitlist/x")


async def test_a_bounced_address_gets_no_email_at_all(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: Sessions,
) -> None:
    # The rows are written `pending` before the bounce arrives: the claim still stops them.
    await jobs_client.send_email("ada@example.com", "Hi", "<p>hi</p>", idempotency_key="k-1")
    await add(sessions, " Ada@Example.COM ", "bounce")
    # ...and a row the job inserts at its claim (the sign-up's confirmation email) is stopped
    # there too.
    entry_id = (await jobs_client.join_waitlist("ada@example.com")).id
    worker = await run_burst("default", settings_=job_settings("resend"))

    assert provider_server.requests == []
    rows = sorted(await outbox_rows(sessions), key=lambda r: r.idempotency_key)
    assert [(r.idempotency_key, r.status, r.attempts) for r in rows] == [
        ("caller/k-1", "suppressed", 0),
        (f"waitlist-confirm/{entry_id}", "suppressed", 0),
    ]
    assert {r.last_error for r in rows} == {"not sent: the recipient is on the suppression list"}
    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)


async def test_an_unsubscribed_address_gets_transactional_but_not_campaign_email(
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: Sessions,
) -> None:
    await add(sessions, "wendy@example.com", "unsubscribe")
    signup = await jobs_client.join_waitlist("wendy@example.com", "Wendy")
    await jobs_client.send_email("wendy@example.com", "Your receipt", "<p>$5</p>")
    await run_burst("default", settings_=job_settings("resend"))

    assert [d.json["subject"] for d in provider_server.delivered] == ["Your receipt"]
    statuses = {r.idempotency_key.split("/")[0]: r.status for r in await outbox_rows(sessions)}
    # The sign-up's confirmation email is waitlist email too (WAITLIST_CONFIRM is on).
    assert statuses == {"waitlist-confirm": "suppressed", "job": "sent"}
    async with sessions() as session:
        entry = await session.get(WaitlistEntry, signup.id)
    # The confirmation is over (settled), so the campaign does not retry it every hour.
    assert entry is not None and entry.next_email_at is None


async def test_an_entry_is_only_ever_widened(sessions: Sessions) -> None:
    await add(sessions, "a@example.com", "unsubscribe", "public")
    await add(sessions, "a@example.com", "bounce", "resend:msg_1")  # widens to all email
    await add(sessions, "b@example.com", "complaint", "sendgrid:e1")
    await add(sessions, "b@example.com", "unsubscribe", "public")  # would narrow: kept
    await add(sessions, "b@example.com", "complaint", "sendgrid:e1")  # a repeat: no change
    assert await entries(sessions) == [
        ("a@example.com", "bounce", "resend:msg_1"),
        ("b@example.com", "complaint", "sendgrid:e1"),
    ]


async def test_suppress_refuses_what_is_not_an_address_or_a_reason(sessions: Sessions) -> None:
    async with sessions.begin() as session:
        with pytest.raises(ValueError, match="not a valid email address"):
            await suppress(session, "nobody", "bounce", "test")
        with pytest.raises(ValueError, match="reason must be one of"):
            await suppress(session, "a@example.com", "annoyed", "test")  # type: ignore[arg-type]
    assert await entries(sessions) == []


async def test_a_resend_bounce_webhook_stops_the_next_email_to_that_address(
    settings: Settings,
    jobs_client: JobsClient,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: Sessions,
) -> None:
    webhooks = Starlette(
        routes=webhook_routes(
            settings.model_copy(update={"resend_webhook_secret": SecretStr(RESEND_SECRET)}),
            lambda: jobs_client,
        )
    )
    body = resend_bounce("Gone@Example.com")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=webhooks), base_url="http://public.test"
    ) as client:
        response = await client.post("/webhooks/resend", content=body, headers=svix_headers(body))
    assert response.status_code == 200
    await run_burst("default", settings_=job_settings("resend"))  # applies the event

    await jobs_client.send_email("gone@example.com", "Still there?", "<p>?</p>")
    await run_burst("default", settings_=job_settings("resend"))
    assert provider_server.requests == []
    assert [r.status for r in await outbox_rows(sessions)] == ["suppressed"]


# -- the operator CLI ----------------------------------------------------------------------


async def cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "worker", "suppress", *args),
        cwd=ROOT,
        env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return await finish(process)


async def test_the_cli_adds_lists_and_removes_entries(
    settings: Settings, sessions: Sessions
) -> None:
    assert (await cli(settings, "add", "Ops@Example.com"))[:2] == (
        0,
        "suppressed ops@example.com (manual)\n",
    )
    code, _, _ = await cli(settings, "add", "u@example.com", "--reason", "unsubscribe")
    assert code == 0
    [(email, reason, source)] = [e for e in await entries(sessions) if e[0] == "ops@example.com"]
    assert (email, reason) == ("ops@example.com", "manual")
    assert source.startswith("cli")

    code, out, _ = await cli(settings, "list", "--reason", "manual")
    assert code == 0
    assert [line.split("\t")[:2] for line in out.splitlines()] == [["ops@example.com", "manual"]]
    code, out, _ = await cli(settings, "list", "--limit", "1")
    assert (code, len(out.splitlines())) == (0, 1)

    assert (await cli(settings, "remove", "OPS@example.com"))[:2] == (
        0,
        "removed ops@example.com from the suppression list\n",
    )
    assert [e[0] for e in await entries(sessions)] == ["u@example.com"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("remove", "nobody@example.com"), "error: nobody@example.com is not on the suppression"),
        (("add", "not-an-address"), "error: cannot suppress 'not-an-address': not a valid email"),
        (("add", "a@example.com", "--reason", "annoyed"), "invalid choice: 'annoyed'"),
        (("list", "--limit", "0"), "must be a whole number of at least 1"),
    ],
)
async def test_cli_mistakes_are_one_line_errors(
    settings: Settings, args: tuple[str, ...], message: str
) -> None:
    code, out, err = await cli(settings, *args)
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err

"""A caller's idempotency key lives in its own namespace: it can never name a platform email."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from arq.connections import ArqRedis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.conftest import RunBurst
from tests.support.provider_server import RESEND_EMAILS, ProviderServer
from worker.client import JobsClient
from worker.settings import Settings

from .conftest import outbox_rows
from .test_trials import add_user, plans


async def test_a_caller_key_naming_a_trial_notice_does_not_pre_settle_it(
    jobs_client: JobsClient,
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    ended = await add_user(sessions, -timedelta(hours=1))
    settings = job_settings("resend")
    # A web app that builds keys from user input: the attacker picks the trial notice's key.
    await jobs_client.send_email(
        "attacker@example.com",
        "anything",
        "<p>not the notice</p>",
        idempotency_key=f"trial-expired/{ended}",
    )
    await run_burst("default", settings_=settings)
    await arq_redis.enqueue_job("check_trial_expirations", _queue_name="default")
    await run_burst("default", settings_=settings)

    sent = {d.json["to"][0]: d.json["subject"] for d in provider_server.delivered}
    assert sent == {
        "attacker@example.com": "anything",
        f"t-{ended.hex[:8]}@example.com": "Your Contact360 trial has ended",  # the real one
    }
    keys = sorted(r.headers["Idempotency-Key"] for r in provider_server.requests_to(RESEND_EMAILS))
    assert keys == [f"caller/trial-expired/{ended}", f"trial-expired/{ended}"]
    rows = {row.idempotency_key: row.status for row in await outbox_rows(sessions)}
    assert rows == {f"caller/trial-expired/{ended}": "sent", f"trial-expired/{ended}": "sent"}
    assert (await plans(sessions))[ended] == "expired"  # expired with its notice delivered

"""The webhook routes on an in-process ASGI app, reached over httpx, with real Redis/PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from tests.webhooks.signing import RESEND_SECRET, SendGridKeys
from worker.client import JobsClient
from worker.settings import Settings
from worker.web.webhooks import webhook_routes


@pytest.fixture(scope="session")
def sendgrid_keys() -> SendGridKeys:
    return SendGridKeys.generate()


@pytest.fixture
def webhook_settings(settings: Settings, sendgrid_keys: SendGridKeys) -> Settings:
    # Through the validators, as the environment would be read.
    return Settings(
        **settings.model_dump(exclude={"resend_webhook_secret", "sendgrid_webhook_public_key"}),
        resend_webhook_secret=RESEND_SECRET,
        sendgrid_webhook_public_key=sendgrid_keys.public_b64,
    )


@pytest.fixture
async def webhooks(
    webhook_settings: Settings, jobs_client: JobsClient
) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=webhook_routes(webhook_settings, lambda: jobs_client))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://public.test") as client:
        yield client

"""The console under test: the real app over httpx's ASGI transport, real Redis and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from worker.settings import Settings
from worker.web.console import create_app

PASSWORD = "console-pw-Tq83"
METRICS_TOKEN = "scrape-token-Zu55"


@pytest.fixture
def console_settings(settings: Settings) -> Settings:
    return Settings(
        **{
            **settings.model_dump(),
            "console_password": PASSWORD,
            "metrics_token": METRICS_TOKEN,
        }
    )


@pytest.fixture
async def anonymous(console_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no session (the attacker's side)."""
    app = create_app(console_settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://console.test"
        ) as client,
    ):
        yield client


async def log_in(client: httpx.AsyncClient) -> str:
    """Sign `client` in; the session's CSRF token (from the page's meta tag)."""
    answer = await client.post("/login", data={"username": "admin", "password": PASSWORD})
    assert answer.status_code == 303, answer.text
    page = await client.get("/")
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert found is not None
    return found[1]


@pytest.fixture
async def operator(anonymous: httpx.AsyncClient) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A signed-in client and its CSRF token."""
    token = await log_in(anonymous)
    yield anonymous, token

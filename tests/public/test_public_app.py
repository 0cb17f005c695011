"""The public app served alone (its own JobsClient, opened by its lifespan) and its refusals."""

from __future__ import annotations

import uuid

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import WaitlistEntry
from tests.support.asgi_server import serve_asgi
from worker.cli import main
from worker.settings import Settings
from worker.tokens import UNSUBSCRIBE, MissingSecretKey, make_token
from worker.web.public import create_app

KEY = SecretStr("a-public-app-test-key-of-32-chars-or-more")


async def test_served_alone_it_opens_its_own_client_and_unsubscribes(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> None:
    entry_id = uuid.uuid4()
    async with sessions.begin() as session:
        session.add(WaitlistEntry(id=entry_id, email="ada@example.com"))
    token = make_token(UNSUBSCRIBE, entry_id, KEY)
    app = create_app(settings.model_copy(update={"secret_key": KEY}))
    async with serve_asgi(app) as base_url, httpx.AsyncClient(base_url=base_url) as http:
        page = await http.get(f"/email/unsubscribe/{token}")
        assert page.status_code == 200
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        assert token not in page.text  # the page never repeats the credential
        answer = await http.post(
            f"/email/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}
        )
        assert answer.status_code == 200
        assert (await http.get("/email/unsubscribe")).status_code == 404
    async with sessions() as session:
        assert await session.scalar(select(WaitlistEntry.unsubscribed_at)) is not None


def test_without_secret_key_the_app_and_the_command_refuse_to_start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(MissingSecretKey, match="SECRET_KEY"):
        create_app(settings)
    monkeypatch.delenv("SECRET_KEY", raising=False)
    assert main(["public", "--port", "1"]) == 2
    assert "SECRET_KEY" in capsys.readouterr().err


def test_settings_refuse_a_short_secret_key_and_a_bad_app_url() -> None:
    with pytest.raises(ValueError, match="SECRET_KEY must be at least 32 characters"):
        Settings(secret_key=SecretStr("short"))
    for bad in ("app.contact360.io", "javascript:alert(1)", "https://x.io/?a=1", "https://x .io"):
        with pytest.raises(ValueError, match="APP_URL"):
            Settings(app_url=bad)
    assert Settings(app_url="https://app.example.com/").app_url == "https://app.example.com"
    assert Settings().waitlist_confirm is True
    secret = "a-secret-that-must-never-be-printed-0123"
    assert secret not in repr(Settings(secret_key=SecretStr(secret)))

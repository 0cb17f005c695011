"""Fixtures for the email and marketing tests: the loopback provider, a client, the rig's Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.routing import Mount

from db.models import EmailMessage
from tests.conftest import RunBurst
from tests.support.asgi_server import serve_asgi
from tests.support.ctx import CtxOpener
from tests.support.provider_server import ProviderServer
from worker.client import JobsClient
from worker.context import Ctx
from worker.http import make_http_client
from worker.settings import Settings
from worker.web.public import create_app

# Short enough that a hang test ends quickly, long enough for a loaded CI machine to answer.
TEST_TIMEOUT = httpx.Timeout(connect=2.0, read=1.0, write=2.0, pool=2.0)


@pytest.fixture(scope="session")
def provider_server_session() -> Iterator[ProviderServer]:
    with ProviderServer() as server:
        yield server


@pytest.fixture
def provider_server(provider_server_session: ProviderServer) -> ProviderServer:
    """The shared fake provider, with scripts, records and idempotency keys cleared."""
    provider_server_session.reset()
    provider_server_session.default_delay_s = 0.0
    return provider_server_session


@pytest.fixture(params=["aiohttp", "httpx"])
async def http(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """A client per transport: the adapters must behave the same over both."""
    async with make_http_client(transport=request.param, timeout=TEST_TIMEOUT) as client:
        yield client


@pytest.fixture
def redis_url(settings: Settings) -> str:
    """The rig's Redis database (TEST_REDIS_DB), so the whole suite stays in one database."""
    return settings.redis_url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def ratelimit_prefix(redis: Redis) -> AsyncIterator[str]:
    """A key prefix of this test's own, deleted afterwards."""
    prefix = f"c360:test:ratelimit:{uuid.uuid4().hex}"
    yield prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


# ---- the email and marketing jobs ---------------------------------------------------------------

API_KEY = "re_test_Sup3rSecretKeyValue_4242"
RECIPIENT = "ada@example.com"
APP_URL = "https://app.contact360.test"
SECRET_KEY = "test-secret-key-that-signs-our-links-0123456789"


@pytest.fixture
def job_settings(settings: Settings, provider_server: ProviderServer) -> Callable[..., Settings]:
    """Settings for one provider on the loopback server: fast retries, a generous rate limit."""

    def build(provider: str = "resend", **overrides: Any) -> Settings:
        update: dict[str, Any] = {
            "email_provider": provider,
            "email_api_key": SecretStr(API_KEY),
            "email_api_base_url": provider_server.base_url,
            "email_from": "Contact360 <no-reply@contact360.test>",
            "email_rate_limit_per_s": 1000.0,
            "marketing_api_base_url": provider_server.base_url,
            "max_retries": 2,
            "retry_base_delay_s": 0.01,
            "app_url": APP_URL,
            "secret_key": SecretStr(SECRET_KEY),
        }
        if overrides.get("marketing_provider") == "sendgrid":
            update["marketing_api_key"] = SecretStr(API_KEY)
        return settings.model_copy(update=update | overrides)

    return build


@pytest.fixture
def client_of(
    arq_redis: ArqRedis,
    sessions: async_sessionmaker[AsyncSession],
    job_settings: Callable[..., Settings],
) -> Callable[..., JobsClient]:
    """`client_of(waitlist_confirm=False)`: a JobsClient on the email tests' settings."""

    def build(**overrides: Any) -> JobsClient:
        return JobsClient(redis=arq_redis, sessions=sessions, settings=job_settings(**overrides))

    return build


@dataclass
class CampaignRig:
    """Burst workers on the email tests' settings (APP_URL and SECRET_KEY set), and the fake."""

    arq_redis: ArqRedis
    run_burst: RunBurst
    settings: Settings
    server: ProviderServer

    async def run_jobs(self) -> None:
        await self.run_burst("default", settings_=self.settings)

    async def tick(self) -> None:
        """One hourly campaign tick (and whatever else is queued)."""
        await self.arq_redis.enqueue_job("send_waitlist_campaign_hourly", _queue_name="default")
        await self.run_jobs()

    def subjects(self) -> list[str]:
        return [d.json["subject"] for d in self.server.delivered]


@pytest.fixture
def rig(
    arq_redis: ArqRedis,
    run_burst: RunBurst,
    job_settings: Callable[..., Settings],
    provider_server: ProviderServer,
) -> CampaignRig:
    return CampaignRig(arq_redis, run_burst, job_settings(), provider_server)


@pytest.fixture
async def public_url(client_of: Callable[..., JobsClient]) -> AsyncIterator[str]:
    """The public app mounted at the root of a host app, as a web app would, over uvicorn."""
    jobs = client_of()
    host = Starlette(routes=[Mount("/", app=create_app(jobs.settings, jobs=jobs))])
    async with serve_asgi(host) as base_url:
        yield base_url


@pytest.fixture(autouse=True)
def short_http_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started in these tests use TEST_TIMEOUT, so a hang ends in a second."""
    import worker.lifecycle

    monkeypatch.setattr(
        worker.lifecycle, "make_http_client", lambda: make_http_client(timeout=TEST_TIMEOUT)
    )


@pytest.fixture
def job_ctx(
    job_settings: Callable[..., Settings], open_ctx: CtxOpener
) -> Callable[..., Awaitable[Ctx]]:
    """`ctx = await job_ctx("sendgrid")`: the real ctx `startup` builds, to call a job directly."""

    async def build(provider: str = "resend", **overrides: Any) -> Ctx:
        return await open_ctx("default", settings=job_settings(provider, **overrides))

    return build


async def outbox_rows(sessions: async_sessionmaker[AsyncSession]) -> list[EmailMessage]:
    async with sessions() as session:
        rows = await session.scalars(select(EmailMessage).order_by(EmailMessage.created_at))
        return list(rows)

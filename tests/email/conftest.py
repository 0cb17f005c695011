"""Fixtures for the email and marketing tests: the loopback provider, a client, the rig's Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from redis.asyncio import Redis

from tests.support.provider_server import ProviderServer
from worker.http import make_http_client
from worker.settings import Settings

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

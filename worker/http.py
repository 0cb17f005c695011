"""The one outbound HTTP client per worker process: httpx's API over a chosen transport.

Why not httpx's default transport: at high concurrency its connection pool costs ~25 ms of CPU
per request (it matches requests to connections in O(connections x requests),
encode/httpcore#1035), so a send-heavy worker is bound by its own client. The `httpx-aiohttp`
transport keeps httpx's API (our providers and tests speak it) and costs ~1 ms; see
`bench/bench_http.py` and the README for the figures measured side by side.

Two things the stock `httpx_aiohttp.AiohttpTransport` (0.2.0) gets wrong for us, fixed here:

- It maps every `aiohttp.ClientConnectionError` to `httpx.ConnectTimeout`, including
  `ServerDisconnectedError` and a reset socket *after the request was sent*. Callers that must
  tell "never reached the server" from "may have reached it" (SendGrid has no idempotency key)
  would be told the wrong thing, so we re-map from the original aiohttp exception.
- It only forwards the connect/read/pool timeouts (aiohttp has no write timeout) and no overall
  deadline; `make_http_client` therefore keeps the read timeout as the bound on a silent server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

TransportName = Literal["aiohttp", "httpx"]

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=15.0, write=15.0, pool=5.0)
# Enough connections for ~250 sends/s against a provider answering in 200 ms (50 in flight),
# with head-room for the marketing sync sharing the client.
DEFAULT_MAX_CONNECTIONS = 200
DEFAULT_MAX_KEEPALIVE_CONNECTIONS = 100
DEFAULT_KEEPALIVE_EXPIRY_S = 30.0


def _remap(exc: httpx.TransportError) -> httpx.TransportError:
    """Turn httpx-aiohttp's coarse mapping into the httpx exception that says what happened."""
    cause = exc.__cause__
    if not isinstance(cause, aiohttp.ClientError):
        return exc
    message = str(exc) or type(cause).__name__
    mapped: httpx.TransportError
    if isinstance(cause, aiohttp.ClientConnectorError):
        # DNS failure, refused, unreachable: the request never left this host.
        mapped = httpx.ConnectError(message)
    elif isinstance(cause, aiohttp.ConnectionTimeoutError):
        # aiohttp's `connect` covers waiting for a pooled connection and opening one.
        mapped = httpx.ConnectTimeout(message)
    elif isinstance(cause, aiohttp.ServerTimeoutError):
        # Includes SocketTimeoutError: no byte arrived within the read timeout.
        mapped = httpx.ReadTimeout(message)
    elif isinstance(cause, aiohttp.ServerDisconnectedError):
        mapped = httpx.RemoteProtocolError(message)
    elif isinstance(cause, aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        mapped = httpx.ReadError(message)
    else:
        return exc
    mapped.__cause__ = cause
    return mapped


class _RemappedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except httpx.TransportError as exc:
            raise _remap(exc) from exc.__cause__

    async def aclose(self) -> None:
        await self._inner.aclose()


class _AiohttpTransport(AiohttpTransport):
    """`AiohttpTransport` whose errors say whether the request may have reached the server."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await super().handle_async_request(request)
        except httpx.TransportError as exc:
            raise _remap(exc) from exc.__cause__
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _RemappedStream(response.stream)
        return response


def make_http_client(
    *,
    transport: TransportName = "aiohttp",
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_keepalive_connections: int = DEFAULT_MAX_KEEPALIVE_CONNECTIONS,
    keepalive_expiry_s: float = DEFAULT_KEEPALIVE_EXPIRY_S,
    base_url: str = "",
) -> httpx.AsyncClient:
    """Build the process's `httpx.AsyncClient`; the caller closes it (`async with` or `aclose`).

    `transport="aiohttp"` (the default, chosen by `bench/bench_http.py`) or `"httpx"` (httpx's
    own pool, for comparison). Must be created inside the event loop that will use it.
    Proxy variables from the environment are ignored (`trust_env=False`): httpx would route them
    through its default transport, silently undoing the choice above; point
    `EMAIL_API_BASE_URL` at a proxy instead.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=keepalive_expiry_s,
    )
    if transport == "aiohttp":
        chosen: httpx.AsyncBaseTransport = _AiohttpTransport(limits=limits, trust_env=False)
    elif transport == "httpx":
        chosen = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    else:
        raise ValueError(f"unknown HTTP transport {transport!r}; expected 'aiohttp' or 'httpx'")
    return httpx.AsyncClient(
        transport=chosen,
        timeout=timeout,
        base_url=base_url,
        trust_env=False,
        follow_redirects=False,
    )

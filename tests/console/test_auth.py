"""Every route's auth, from the attacker's side: no session, a forged cookie, no CSRF token,
a wrong password, a wrong bearer token."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
import redis.asyncio as aioredis
from itsdangerous import URLSafeTimedSerializer

from tests.console.conftest import METRICS_TOKEN, PASSWORD, log_in
from tests.support.redis_replies import reply
from worker.web.auth import (
    FIRST_SLOWDOWN_S,
    LOCKOUT_AFTER_FAILURES,
    LOGIN_FAILURES_PREFIX,
    SESSION_COOKIE,
)

PAGES = [
    "/",
    "/workers",
    "/jobs/import:00000000-0000-0000-0000-000000000001",
    "/failures",
    "/imports",
    "/imports/00000000-0000-0000-0000-000000000001",
    "/exports",
    "/exports/00000000-0000-0000-0000-000000000001/download",
    "/email",
    "/cron",
]
APIS = [
    "/api/overview",
    "/api/workers",
    "/api/jobs/x",
    "/api/failures",
    "/api/imports",
    "/api/imports/00000000-0000-0000-0000-000000000001",
    "/api/exports",
    "/api/email",
    "/api/cron",
]
ID = "00000000-0000-0000-0000-000000000001"
POSTS = [
    f"/api/imports/{ID}/cancel",
    f"/api/imports/{ID}/retry",
    f"/api/exports/{ID}/retry",
    f"/api/email/{ID}/mark-sent",
    f"/api/email/{ID}/send-again",
    "/logout",
]


async def test_healthz_is_open(anonymous: httpx.AsyncClient) -> None:
    answer = await anonymous.get("/healthz")
    assert (answer.status_code, answer.text) == (200, "ok")


@pytest.mark.parametrize("path", PAGES)
async def test_pages_redirect_to_login_without_a_session(
    anonymous: httpx.AsyncClient, path: str
) -> None:
    answer = await anonymous.get(path)
    assert answer.status_code == 303 and answer.headers["location"] == "/login"


@pytest.mark.parametrize("path", APIS)
async def test_api_answers_401_without_a_session(anonymous: httpx.AsyncClient, path: str) -> None:
    assert (await anonymous.get(path)).status_code == 401


@pytest.mark.parametrize("path", POSTS)
async def test_posts_answer_401_without_a_session(anonymous: httpx.AsyncClient, path: str) -> None:
    assert (await anonymous.post(path)).status_code == 401


def _forged(key: str) -> str:
    return URLSafeTimedSerializer(key, salt="c360-console-session").dumps({"u": "admin", "c": "x"})


@pytest.mark.parametrize(
    "cookie",
    [
        "garbage",
        _forged("a-guessed-key"),
        _forged(PASSWORD),  # signed with the password itself, not the derived key
        _forged("").rsplit(".", 1)[0] + ".AAAA",
    ],
    # The cookies carry a timestamp: fixed ids keep every xdist worker collecting alike.
    ids=["garbage", "guessed-key", "password-as-key", "truncated-signature"],
)
async def test_a_forged_session_cookie_is_refused(
    anonymous: httpx.AsyncClient, cookie: str
) -> None:
    anonymous.cookies.set(SESSION_COOKIE, cookie)
    assert (await anonymous.get("/api/overview")).status_code == 401
    assert (await anonymous.get("/")).status_code == 303


async def test_login_sets_a_signed_httponly_strict_cookie(anonymous: httpx.AsyncClient) -> None:
    form = await anonymous.get("/login")
    assert form.status_code == 200 and 'id="login-form"' in form.text
    answer = await anonymous.post("/login", data={"username": "admin", "password": PASSWORD})
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert PASSWORD.lower() not in cookie
    assert (await anonymous.get("/api/overview")).status_code == 200


@pytest.mark.parametrize(
    "form",
    [
        {"username": "admin", "password": "wrong"},
        {"username": "root", "password": PASSWORD},
        {"username": "admin"},
        {},
    ],
)
async def test_a_wrong_login_answers_401_and_sets_nothing(
    anonymous: httpx.AsyncClient, form: dict[str, str]
) -> None:
    answer = await anonymous.post("/login", data=form)
    assert answer.status_code == 401
    assert "set-cookie" not in answer.headers
    assert (await anonymous.get("/api/overview")).status_code == 401


async def test_a_typo_then_the_right_password_gets_in_and_forgets_the_failure(
    anonymous: httpx.AsyncClient, redis_raw: aioredis.Redis
) -> None:
    assert (await anonymous.post("/login", data={"password": "typo"})).status_code == 401
    key = LOGIN_FAILURES_PREFIX + "127.0.0.1"
    # redis-py types hget's reply as str, but a client without decode_responses gets bytes.
    assert await reply(redis_raw.hget(key, "failures")) == b"1"  # type: ignore[comparison-overlap]
    await log_in(anonymous)
    assert not await redis_raw.exists(key)


async def test_failed_logins_are_slowed_then_lock_the_client_out_in_redis(
    anonymous: httpx.AsyncClient, redis_raw: aioredis.Redis
) -> None:
    waits = []
    for guess in range(LOCKOUT_AFTER_FAILURES):
        started = time.monotonic()
        answer = await anonymous.post("/login", data={"password": f"guess{guess}"})
        waits.append(time.monotonic() - started)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers
    # Each wrong answer waits at least its slowdown (0.25 s, doubling): guessing costs time.
    assert all(wait >= FIRST_SLOWDOWN_S * 2**n * 0.9 for n, wait in enumerate(waits[:3]))
    key = LOGIN_FAILURES_PREFIX + "127.0.0.1"
    assert not await reply(redis_raw.hexists(key, "until_ms"))  # slowed so far, not locked out
    assert (await anonymous.post("/login", data={"password": "one more"})).status_code == 401
    # Locked out now: even the right password is not checked while the lockout holds.
    locked = await anonymous.post("/login", data={"username": "admin", "password": PASSWORD})
    assert locked.status_code == 429 and "set-cookie" not in locked.headers
    assert int(locked.headers["retry-after"]) >= 1
    failures = LOCKOUT_AFTER_FAILURES + 1
    assert await reply(redis_raw.hget(key, "failures")) == str(failures).encode()  # type: ignore[comparison-overlap]  # bytes, as above
    # The state lives in Redis, so every console process sees it; lifting it there lets the
    # client in again.
    await reply(redis_raw.hset(key, "until_ms", "0"))
    await log_in(anonymous)
    assert not await redis_raw.exists(key)


@pytest.mark.parametrize("path", POSTS)
async def test_posts_without_the_csrf_token_answer_403(
    operator: tuple[httpx.AsyncClient, str], path: str
) -> None:
    client, token = operator
    assert (await client.post(path)).status_code == 403
    assert (await client.post(path, data={"csrf_token": token + "x"})).status_code == 403
    assert (await client.post(path, headers={"x-csrf-token": "nope"})).status_code == 403
    # Still signed in: a refused logout changed nothing.
    assert (await client.get("/api/overview")).status_code == 200


async def test_logout_with_the_token_ends_the_session(
    operator: tuple[httpx.AsyncClient, str],
) -> None:
    client, token = operator
    answer = await client.post("/logout", data={"csrf_token": token})
    assert answer.status_code == 303
    assert (await client.get("/api/overview")).status_code == 401


async def test_security_headers_on_every_answer(anonymous: httpx.AsyncClient) -> None:
    for path in ("/login", "/healthz", "/static/console.js", "/api/overview"):
        headers = (await anonymous.get(path)).headers
        csp = headers["content-security-policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp, path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["referrer-policy"] == "no-referrer", path


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token",
        f"Bearer {METRICS_TOKEN}x",
        _basic("admin", "wrong"),
        _basic("root", PASSWORD),
        "Basic !!!",
    ],
)
async def test_metrics_refuse_wrong_credentials(
    anonymous: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    answer = await anonymous.get("/metrics", headers=headers)
    assert answer.status_code == 401


@pytest.mark.parametrize("authorization", [f"Bearer {METRICS_TOKEN}", _basic("admin", PASSWORD)])
async def test_metrics_allow_the_token_or_basic_credentials(
    anonymous: httpx.AsyncClient, authorization: str
) -> None:
    answer = await anonymous.get("/metrics", headers={"authorization": authorization})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")


async def test_metrics_allow_a_session(operator: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = operator
    assert (await client.get("/metrics")).status_code == 200

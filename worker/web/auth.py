"""Who may use the console: the login, the signed session cookie, CSRF, and /metrics' scrapers.

- One operator account (`CONSOLE_USER` / `CONSOLE_PASSWORD`), compared in constant time.
- The session is a cookie signed with a key derived from the password (itsdangerous, with a
  timestamp): changing `CONSOLE_PASSWORD` signs every open session out. It carries the user
  and the session's CSRF token, which every POST must echo (form field or header).
- Failed logins are slowed down, then locked out, per client address, kept in Redis so that
  every console process (and a restarted one) enforces it: the answer to each of the first
  LOCKOUT_AFTER_FAILURES wrong passwords is a 401 that waits longer each time (an operator's
  typo costs a moment, and the right password right after it still gets in); past them the
  client is locked out (429, nothing checked) for a time that doubles with each failure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

from itsdangerous import BadSignature, URLSafeTimedSerializer
from redis.asyncio import Redis
from starlette.requests import Request

from worker.settings import Settings

SESSION_COOKIE = "c360_console"
SESSION_MAX_AGE_S = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
LOGIN_FAILURES_PREFIX = "c360:console:login-failures:"
# The n-th failed answer waits FIRST_SLOWDOWN_S * 2^(n-1), at most MAX_SLOWDOWN_S: 0.25 s to 2 s.
FIRST_SLOWDOWN_S = 0.25
MAX_SLOWDOWN_S = 2.0
# The failure after those locks the client out for 1 s, each further one doubles it, to 5 min.
LOCKOUT_AFTER_FAILURES = 5
FIRST_LOCKOUT_S = 1.0
MAX_LOCKOUT_S = 300.0
# Failures are forgotten this long after the last one.
FAILURE_MEMORY_S = 3600


class ConsoleNotConfigured(ValueError):
    """The console has no password: it must not start."""


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    csrf_token: str


def console_password(settings: Settings) -> str:
    if settings.console_password is None:
        raise ConsoleNotConfigured(
            "CONSOLE_PASSWORD is not set: the console refuses to start without a password "
            "(set it in the environment or .env)"
        )
    return settings.console_password.get_secret_value()


class Authenticator:
    """Checks credentials and signs sessions for one console app."""

    def __init__(self, settings: Settings) -> None:
        password = console_password(settings)
        self._user = settings.console_user.encode()
        self._password = password.encode()
        token = settings.metrics_token
        self._metrics_token = token.get_secret_value().encode() if token else None
        # A derived key, so the cookie's signature never reveals anything about the password.
        key = hashlib.sha256(b"c360-console-session\0" + self._password).hexdigest()
        self._serializer = URLSafeTimedSerializer(key, salt="c360-console-session")

    def __repr__(self) -> str:
        return "Authenticator(<secrets hidden>)"

    def credentials_match(self, user: str, password: str) -> bool:
        # Both compared, always: no early exit tells a wrong user from a wrong password.
        user_ok = hmac.compare_digest(user.encode(), self._user)
        password_ok = hmac.compare_digest(password.encode(), self._password)
        return user_ok and password_ok

    def new_session_cookie(self) -> str:
        return self._serializer.dumps({"u": self._user.decode(), "c": secrets.token_urlsafe(32)})

    def session(self, request: Request) -> Session | None:
        """The request's valid session, or None (no cookie, forged, expired, another key)."""
        raw = request.cookies.get(SESSION_COOKIE)
        if not raw:
            return None
        try:
            data = self._serializer.loads(raw, max_age=SESSION_MAX_AGE_S)
        except BadSignature:  # SignatureExpired is one too
            return None
        if not isinstance(data, dict) or not hmac.compare_digest(
            str(data.get("u", "")).encode(), self._user
        ):
            return None
        return Session(user=str(data["u"]), csrf_token=str(data.get("c", "")))

    def metrics_allowed(self, request: Request) -> bool:
        """HTTP Basic with the console's credentials, a session, or `Bearer METRICS_TOKEN`."""
        if self.session(request) is not None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._metrics_token is not None:
            return hmac.compare_digest(value.strip().encode(), self._metrics_token)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            user, colon, password = decoded.partition(":")
            return bool(colon) and self.credentials_match(user, password)
        return False

    # -- failed logins ------------------------------------------------------------------

    async def locked_for_s(self, redis: Redis, client: str) -> float:
        """Seconds until `client` may try to log in again (0.0: now)."""
        # redis-py types hash commands for sync and async clients at once.
        raw = await cast(Awaitable[Any], redis.hget(LOGIN_FAILURES_PREFIX + client, "until_ms"))
        if raw is None:
            return 0.0
        return max(0.0, (int(raw) - time.time() * 1000) / 1000)

    async def login_failed(self, redis: Redis, client: str) -> float:
        """Count a failure; how long its 401 should wait before it is answered, in seconds.

        From the (LOCKOUT_AFTER_FAILURES + 1)-th failure on, it also starts a lockout."""
        key = LOGIN_FAILURES_PREFIX + client
        failures = int(await cast(Awaitable[Any], redis.hincrby(key, "failures", 1)))
        slowdown_s = min(MAX_SLOWDOWN_S, FIRST_SLOWDOWN_S * 2.0 ** min(failures - 1, 30))
        async with redis.pipeline(transaction=False) as pipe:
            if failures > LOCKOUT_AFTER_FAILURES:
                past = min(failures - LOCKOUT_AFTER_FAILURES - 1, 30)
                lockout_s = min(MAX_LOCKOUT_S, FIRST_LOCKOUT_S * 2.0**past)
                # Counted from when the slowed answer leaves, not from now.
                until_ms = (time.time() + slowdown_s + lockout_s) * 1000
                pipe.hset(key, "until_ms", str(int(until_ms)))
            pipe.expire(key, FAILURE_MEMORY_S)
            await pipe.execute()
        return slowdown_s

    async def login_succeeded(self, redis: Redis, client: str) -> None:
        await redis.delete(LOGIN_FAILURES_PREFIX + client)


def csrf_matches(session: Session, submitted: str | None) -> bool:
    return bool(submitted) and hmac.compare_digest(
        str(submitted).encode(), session.csrf_token.encode()
    )


def client_of(request: Request) -> str:
    """The client a lockout applies to: its address (behind a proxy, the proxy's)."""
    return request.client.host if request.client else "unknown"

"""Typed settings, read from the environment (CONTRACT §3) and checked once at start-up.

Nothing here runs at import time: callers build `Settings()` themselves, tests build
`Settings(database_url=..., ...)` directly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

from arq.connections import RedisSettings
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from db.session import Pooler

RESEND_API_BASE_URL = "https://api.resend.com"
SENDGRID_API_BASE_URL = "https://api.sendgrid.com"
# 32 characters of token_urlsafe carry ~190 bits: more than HMAC-SHA256 needs, and short
# enough that nobody is tempted to pick a word instead.
MIN_SECRET_KEY_CHARS = 32
# Provider API requests per second for a new account, when EMAIL_RATE_LIMIT_PER_S is unset (a
# batch of up to 100 emails is one request).
# - Resend: "The default maximum rate limit is 5 requests per second per team. This limit
#   applies across all API keys" (https://resend.com/docs/api-reference/rate-limit; earlier
#   revisions of the page said 2). A team granted more sets EMAIL_RATE_LIMIT_PER_S.
# - SendGrid: Twilio publishes no fixed figure for v3 mail/send (limits are per endpoint and
#   read from `X-RateLimit-*`: https://www.twilio.com/docs/sendgrid/api-reference/
#   how-to-use-the-sendgrid-v3-api/rate-limits); its documented default for its other endpoints
#   is 600 requests/minute/user (Twilio changelog 2019-10-10, "Imposing Rate Limits on some
#   SendGrid V2 API Endpoints"), i.e. 10/s, which we keep. A 429 still pauses every process.
# - console: nothing leaves the process; a generous figure keeps development quick.
DEFAULT_EMAIL_RATE_PER_S: dict[str, float] = {"resend": 5.0, "sendgrid": 10.0, "console": 100.0}
# SendGrid Marketing Contacts (MARKETING_PROVIDER=sendgrid), unless MARKETING_RATE_LIMIT_PER_S.
DEFAULT_MARKETING_RATE_PER_S = 10.0
# Fields whose empty value means "not set", so that their default applies as if absent.
_UNSET_WHEN_EMPTY = frozenset({"worker_max_jobs_per_process"})


class Settings(BaseSettings):
    """Every knob of the worker. Secrets are `SecretStr`: their values never reach a log or repr."""

    # hide_input_in_errors: a rejected value may be a URL with a password (L2); see __init__.
    model_config = SettingsConfigDict(
        env_file=None, extra="ignore", frozen=True, hide_input_in_errors=True
    )

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/contact360"
    # `pgbouncer`: DATABASE_URL points at PgBouncer in transaction pooling mode, so no
    # prepared statement may outlive a transaction (db/session.py turns both caches off).
    database_pooler: Pooler = "none"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis through Sentinel (worker/redis_connect.py): `host:port,host:port`; empty = off.
    # REDIS_URL then gives only the database number, the password and TLS (rediss://).
    redis_sentinels: str = ""
    redis_sentinel_master: str = "mymaster"
    # The Sentinels' own `requirepass`, when they have one (the master's is REDIS_URL's).
    redis_sentinel_password: SecretStr | None = None

    import_dir: Path = Path("./data/imports")
    storage_backend: Literal["local", "s3"] = "local"
    export_dir: Path = Path("./data/exports")
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    # No default: the default worker refuses to start without it (worker/preflight.py), so a
    # deploy that forgot it cannot settle email `sent` through the console provider.
    email_provider: Literal["console", "resend", "sendgrid"] | None = None
    email_api_key: SecretStr | None = None
    email_from: str = "Contact360 <no-reply@localhost>"
    email_api_base_url: str | None = None
    # Provider requests per second, across all workers; unset: the provider's documented
    # default for a new account (DEFAULT_EMAIL_RATE_PER_S). Read it as `email_rate_per_s`.
    email_rate_limit_per_s: float | None = Field(default=None, gt=0)

    marketing_provider: Literal["none", "sendgrid"] = "none"
    marketing_api_key: SecretStr | None = None
    marketing_api_base_url: str | None = None
    # The marketing API's own limit (its own limiter key): never the email provider's figure.
    marketing_rate_limit_per_s: float | None = Field(default=None, gt=0)

    job_timeout_s: float = Field(default=1800, gt=0)
    job_soft_timeout_s: float = Field(default=1500, gt=0)
    keep_result_s: float = Field(default=3600, ge=0)
    max_retries: int = Field(default=3, ge=0)
    retry_base_delay_s: float = Field(default=60, ge=0)

    worker_max_jobs_per_process: int = Field(default=1000, gt=0)
    worker_max_memory_mb: int = Field(default=200, gt=0)

    import_batch_rows: int = Field(default=5000, gt=0)
    import_max_stored_errors: int = Field(default=1000, ge=0)

    # Fair sharing (worker/fairness/): how many of one user's imports (exports) run at once,
    # counted across every worker process; the user's further jobs wait without a worker slot.
    import_max_running_per_user: int = Field(default=1, ge=1)
    export_max_running_per_user: int = Field(default=1, ge=1)

    # The web console (worker/web): no default password, `python -m worker console` refuses
    # to start without one. METRICS_TOKEN lets a Prometheus scraper in without the password.
    console_user: str = Field(default="admin", min_length=1)
    console_password: SecretStr | None = None
    metrics_token: SecretStr | None = None

    # The public web app (worker/web/public.py): links in email point at APP_URL, and their
    # tokens are signed with SECRET_KEY (worker/tokens.py). No defaults: a staging deploy must
    # not link to production, and a guessable key would let anyone unsubscribe anyone.
    app_url: str | None = None
    secret_key: SecretStr | None = None
    # Double opt-in for the waitlist: sign-up sends a confirmation link, the campaign starts
    # when it is used (jobs/email/campaign.py).
    waitlist_confirm: bool = True
    # Provider webhooks (worker/web/webhooks.py): Resend's Svix signing secret (`whsec_...`)
    # and the base64 verification key of SendGrid's Signed Event Webhook. Unset: that
    # provider's webhook answers 503 and stores nothing.
    resend_webhook_secret: SecretStr | None = None
    sendgrid_webhook_public_key: str | None = None

    @field_validator("database_url")
    @classmethod
    def _database_url_is_async_postgres(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "DATABASE_URL is not a database URL; expected "
                "postgresql+asyncpg://USER[:PASSWORD]@HOST:PORT/DBNAME"
            ) from None
        if url.drivername not in ("postgresql+asyncpg", "postgresql", "postgres"):
            raise ValueError(
                f"DATABASE_URL must point to PostgreSQL (postgresql+asyncpg://...), "
                f"not {url.drivername!r}"
            )
        if not url.database:
            raise ValueError("DATABASE_URL names no database (add /DBNAME at the end)")
        # Accept the plain scheme users copy from elsewhere, but always talk asyncpg.
        return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)

    @field_validator("app_url")
    @classmethod
    def _app_url_is_http(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("APP_URL must be the web app's base URL, e.g. https://app.example.com")
        if parts.query or parts.fragment or any(ord(c) < 33 or ord(c) == 127 for c in value):
            raise ValueError("APP_URL must be a plain base URL (no query, fragment or spaces)")
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if len(value.get_secret_value()) < MIN_SECRET_KEY_CHARS:
            raise ValueError(
                f"SECRET_KEY must be at least {MIN_SECRET_KEY_CHARS} characters; generate one "
                "with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator(
        "email_api_key",
        "marketing_api_key",
        "console_password",
        "metrics_token",
        "redis_sentinel_password",
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        # `EMAIL_API_KEY=` (an .env line left empty) must read as missing, so a provider that
        # needs a key refuses to start instead of failing every send with a 401.
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("resend_webhook_secret")
    @classmethod
    def _svix_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        # Imported only when set: `cryptography` costs every worker process memory it never uses.
        from worker.webhook_signatures import svix_key

        try:
            svix_key(value.get_secret_value().strip())
        except ValueError as exc:
            raise ValueError(f"RESEND_WEBHOOK_SECRET {exc}") from None
        return SecretStr(value.get_secret_value().strip())

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _sendgrid_public_key(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from worker.webhook_signatures import sendgrid_key

        try:
            sendgrid_key(value)
        except ValueError as exc:
            raise ValueError(f"SENDGRID_WEBHOOK_PUBLIC_KEY {exc}") from None
        return value.strip()

    @field_validator("email_rate_limit_per_s", "marketing_rate_limit_per_s", mode="before")
    @classmethod
    def _empty_rate_is_unset(cls, value: Any) -> Any:
        # `EMAIL_RATE_LIMIT_PER_S=` (compose passes an unset variable as empty) means "default".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_list(cls, value: str) -> str:
        pairs = parse_sentinels(value)
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in pairs)

    @field_validator("redis_sentinel_master")
    @classmethod
    def _sentinel_master_name(cls, value: str) -> str:
        value = value.strip()
        if not _SENTINEL_MASTER_NAME.fullmatch(value):
            raise ValueError(
                "REDIS_SENTINEL_MASTER must be the name the Sentinels monitor (`sentinel "
                "monitor NAME ...`): letters, digits, '.', '-', '_'"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _empty_count_is_unset(cls, data: Any) -> Any:
        # `WORKER_MAX_JOBS_PER_PROCESS=` (compose passes an unset variable as empty) is dropped,
        # not defaulted: only an operator's value may enter `model_fields_set`, which turns the
        # per-slot count into a per-process one (worker/recycle.py `job_limit`).
        if not isinstance(data, dict):
            return data
        return {
            key: value
            for key, value in data.items()
            if not (key in _UNSET_WHEN_EMPTY and isinstance(value, str) and not value.strip())
        }

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.redis_sentinels and self.redis_url.startswith("unix://"):
            raise ValueError(
                "REDIS_SENTINELS needs a redis:// or rediss:// REDIS_URL (a unix socket names "
                "one server; Sentinel names the master)"
            )
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError(
                "STORAGE_BACKEND=s3 needs S3_BUCKET (the bucket exports are written to)"
            )
        if self.job_soft_timeout_s >= self.job_timeout_s:
            raise ValueError(
                f"JOB_SOFT_TIMEOUT_S ({self.job_soft_timeout_s:g}) must be below "
                f"JOB_TIMEOUT_S ({self.job_timeout_s:g})"
            )
        if self.email_provider in ("resend", "sendgrid") and self.email_api_key is None:
            raise ValueError(f"EMAIL_PROVIDER={self.email_provider} needs EMAIL_API_KEY")
        if self.marketing_provider != "none" and self.marketing_api_key is None:
            raise ValueError(
                f"MARKETING_PROVIDER={self.marketing_provider} needs MARKETING_API_KEY"
            )
        return self

    @property
    def database(self) -> URL:
        """`DATABASE_URL` parsed; render it with `hide_password=True` anywhere it may be shown."""
        return make_url(self.database_url)

    @property
    def redis_sentinel_addresses(self) -> list[tuple[str, int]]:
        """`REDIS_SENTINELS` as (host, port) pairs; empty when Redis is reached directly."""
        return parse_sentinels(self.redis_sentinels)

    def redis_settings(self) -> RedisSettings:
        """`REDIS_URL` (and the Sentinels, when set) for arq; its repr masks the password.

        Through Sentinel nothing of ours connects with it: worker/redis_connect.py makes the
        pools, with the timeouts and Sentinel password that arq's Sentinel branch leaves out.
        """
        parsed = RedisSettings.from_dsn(self.redis_url)
        fields = vars(parsed)
        if self.redis_sentinels:
            fields.update(
                host=self.redis_sentinel_addresses,
                sentinel=True,
                sentinel_master=self.redis_sentinel_master,
            )
        return _MaskedRedisSettings(**fields)

    @property
    def email_rate_per_s(self) -> float:
        """Provider requests per second: EMAIL_RATE_LIMIT_PER_S, or the provider's default."""
        if self.email_rate_limit_per_s is not None:
            return self.email_rate_limit_per_s
        return DEFAULT_EMAIL_RATE_PER_S.get(self.email_provider or "console", 10.0)

    @property
    def marketing_rate_per_s(self) -> float:
        if self.marketing_rate_limit_per_s is not None:
            return self.marketing_rate_limit_per_s
        return DEFAULT_MARKETING_RATE_PER_S

    @property
    def email_base_url(self) -> str:
        if self.email_api_base_url:
            return self.email_api_base_url.rstrip("/")
        return RESEND_API_BASE_URL if self.email_provider == "resend" else SENDGRID_API_BASE_URL

    @property
    def marketing_base_url(self) -> str:
        return (self.marketing_api_base_url or SENDGRID_API_BASE_URL).rstrip("/")

    if not TYPE_CHECKING:  # keeps the pydantic plugin's typed __init__ for mypy

        def __init__(self, *args: Any, **values: Any) -> None:
            # hide_input_in_errors only hides the input from str(error); errors() and json()
            # still carry it, and so would a ValidationError chained as __context__. Re-raise
            # outside the except block, without any input, whoever builds Settings.
            try:
                super().__init__(*args, **values)
                return
            except ValidationError as exc:
                title = exc.title
                details = [
                    {**error, "input": "<hidden>"}
                    for error in exc.errors(include_input=False, include_url=False)
                ]
            raise ValidationError.from_exception_data(title, details, hide_input=True)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # Both URLs may carry a password: show it masked like SecretStr does.
        for name, value in super().__repr_args__():
            if name in ("database_url", "redis_url"):
                yield name, mask_url_password(value)
            else:
                yield name, value


class _MaskedRedisSettings(RedisSettings):
    # Reprs end up in tracebacks and in error trackers' captured frame locals (arq's
    # create_pool holds one while it retries a connection).
    def __repr__(self) -> str:
        shown = {**vars(self), "password": "***" if self.password else self.password}
        return "RedisSettings({})".format(", ".join(f"{k}={v!r}" for k, v in shown.items()))


_SENTINEL_MASTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}")


def parse_sentinels(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (IPv6 as `[::1]:26379`) as pairs; `ValueError` saying which entry."""
    if not value.strip():
        return []
    found: list[tuple[str, int]] = []
    entries = value.split(",")
    for position, raw in enumerate(entries, start=1):
        # Named by position, never echoed: a mistyped entry may hold a password (user:pw@...).
        where = f"REDIS_SENTINELS entry {position} of {len(entries)}"
        host, colon, port = raw.strip().rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:
            host = host[1:-1]
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{where} is not host:port (expected e.g. "
                "10.0.0.5:26379,10.0.0.6:26379,10.0.0.7:26379)"
            )
        if not (_IPV6 if bracketed else _HOST_NAME).fullmatch(host):
            raise ValueError(f"{where} is not a host name or address")
        if (host, int(port)) in found:
            raise ValueError(f"{where} repeats an earlier one")
        found.append((host, int(port)))
    return found


def mask_url_password(url: str) -> str:
    """`url` with its password (user info or `?password=`) replaced by `***`, for display."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even a URL: nothing in it can be shown safely
        return "***"
    netloc, query = parts.netloc, parts.query
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key.lower() == "password" for key, _ in pairs):
        masked = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        query = urlencode(masked, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # Rebuilt by hand: urlunsplit drops the "//" of an empty host (unix:///path).
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )

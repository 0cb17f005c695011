"""The provider interface and the one place HTTP outcomes become worker errors.

What an answer means (the errors themselves are drawn in `worker.errors`):

- a 2xx: sent; 429: `RateLimited(retry_after_s)`, every process waits (see worker.ratelimit);
- 401/403 and sending-domain refusals: `ProviderFault(retry_after_s)`, the account is at fault,
  not the message; sending halts everywhere, rows stay pending;
- 5xx (and a provider's own transient statuses): `TransientError`, retried with backoff;
- other 4xx: `PermanentError`, the provider's message is recorded and nothing is retried;
- a failed exchange: `TransientError` when nothing can have been sent, `DeliveryUnknown` when
  the request may have reached the provider (resend only where it deduplicates).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any, Protocol, runtime_checkable

import httpx
from pydantic import SecretStr

from worker.errors import PermanentError, ProviderFault, RateLimited, TransientError
from worker.retry import retry_after_from_headers

# A 429 without a usable wait header: wait this long. Resend's default limit is per second
# (https://resend.com/docs/api-reference/rate-limit), so a short pause is the right guess.
DEFAULT_RETRY_AFTER_S = 1.0
# A provider asking for longer than this is more likely a broken header than a real reset;
# the job retries and sees a fresh answer.
MAX_RETRY_AFTER_S = 300.0
# Provider messages are stored in the outbox and shown to people: keep them short.
MAX_ERROR_MESSAGE_CHARS = 500
# How long every sender stops after the provider refused the account. A key or a domain is
# fixed by a person, not by the next second: one probe per pause is enough, and a deploy with
# the fixed key needs about this long (or `RateLimiter.resume()`) to send again.
PROVIDER_FAULT_PAUSE_S = 300.0


# RFC 5322 §2.2 and §3.6.8: a field name is printable ASCII but ':'; a line is at most 998
# characters. A control character in a value (CR, LF above all) could start a header of the
# caller's choosing: header injection.
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_HEADER_VALUE_CHARS = 998
# The provider writes these from its own request fields (from, to, subject, ...) or itself;
# a second copy in `headers` would be rejected or, worse, win.
RESERVED_HEADERS = frozenset(
    {
        "from", "to", "cc", "bcc", "subject", "reply-to", "sender", "date", "message-id",
        "mime-version", "content-type", "content-transfer-encoding", "return-path",
    }
)  # fmt: skip


def check_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of `headers` if every name and value is safe to send; `ValueError` naming it."""
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"email header name {name!r} is not a valid header field name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"email header {name!r} is set by the provider, not in headers")
        if not isinstance(value, str) or _CONTROL.search(value):
            raise ValueError(f"email header {name!r}: the value holds a line break or control")
        if len(value) > MAX_HEADER_VALUE_CHARS:
            raise ValueError(f"email header {name!r} is over {MAX_HEADER_VALUE_CHARS} characters")
        checked[name] = value
    return checked


class DeliveryUnknown(TransientError):
    """The request may have been accepted before the connection failed; resending may duplicate."""


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    """One email as the caller means it. `sender` is `Name <addr>` or a bare address.

    `headers` are extra header fields (`List-Unsubscribe`, ...), checked by `check_headers`:
    a line break or control character in a name or value raises `ValueError`.
    """

    sender: str
    to: Sequence[str]
    subject: str
    html: str
    text: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.to:
            raise ValueError("an email needs at least one recipient")
        # Accept any sequence (a list from a job's JSON arguments) but keep the value immutable.
        object.__setattr__(self, "to", tuple(self.to))
        object.__setattr__(self, "headers", check_headers(self.headers))


class EmailProvider(Protocol):
    """Sends one email. `send` returns the provider's message id.

    Raises `DeliveryUnknown`, `RateLimited`, `TransientError` or `PermanentError`, never an
    httpx exception. The same `idempotency_key` for a resend of the same logical message.
    """

    @property
    def name(self) -> str: ...

    async def send(self, email: OutgoingEmail, idempotency_key: str) -> str: ...


# What a batch send answers for each member, in order: the provider's message id, or the
# provider's refusal of that member alone (an invalid address); the others were accepted.
MemberAnswer = str | PermanentError


@runtime_checkable
class BatchEmailProvider(EmailProvider, Protocol):
    """A provider that takes up to `max_batch` emails in one request (Resend's batch)."""

    @property
    def max_batch(self) -> int: ...

    async def send_batch(
        self, emails: Sequence[OutgoingEmail], idempotency_key: str
    ) -> list[MemberAnswer]:
        """One request for all `emails`; raises for the whole batch like `send` does."""
        ...


def batch_capacity(provider: EmailProvider) -> int:
    """How many emails one request to `provider` carries (1 without a batch endpoint)."""
    return provider.max_batch if isinstance(provider, BatchEmailProvider) else 1


def split_address(address: str) -> tuple[str, str]:
    """`'Contact360 <no-reply@x.io>'` -> `('Contact360', 'no-reply@x.io')`."""
    name, addr = parseaddr(address)
    if not addr:
        raise ValueError(f"not an email address: {address!r}")
    return name, addr


def redact(text: str, secret: SecretStr | None) -> str:
    """Remove the API key from text that came from outside (a provider may echo headers)."""
    if secret is None:
        return text
    value = secret.get_secret_value()
    return text.replace(value, "**********") if value else text


def retry_after_s(response: httpx.Response, *, now_s: float | None = None) -> float:
    """Seconds to wait after a 429, from `retry-after` or SendGrid's `X-RateLimit-Reset`.

    `retry-after` is delta-seconds (Resend); `X-RateLimit-Reset` is a Unix time (SendGrid,
    https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/rate-limits).
    Clamped to [0, MAX_RETRY_AFTER_S]; absent or unparsable: DEFAULT_RETRY_AFTER_S.
    """
    wait_s = retry_after_from_headers(response.headers, now_s)
    if wait_s is None:
        return DEFAULT_RETRY_AFTER_S
    return min(wait_s, MAX_RETRY_AFTER_S)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def resend_error_message(body: Any) -> str | None:
    """Resend: `{"statusCode": 422, "name": "validation_error", "message": "..."}`."""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        name = body.get("name")
        message: str = body["message"]
        return f"{name}: {message}" if isinstance(name, str) and name else message
    return None


def resend_account_refused(status: int, body: Any) -> bool:
    """Resend refuses the account with 401 `missing_api_key` / `restricted_api_key`, 403
    `invalid_api_key` and 403 `validation_error` (a domain not verified, or test mode sending
    to others), and the sender with 422 `invalid_from_address`: EMAIL_FROM comes from our
    settings, so no message can fix it (https://resend.com/docs/api-reference/errors,
    https://resend.com/docs/knowledge-base/403-error-domain-mismatch).
    """
    if account_refused(status, body):
        return True
    return status == 422 and isinstance(body, dict) and body.get("name") == "invalid_from_address"


def sendgrid_error_message(body: Any) -> str | None:
    """SendGrid: `{"errors": [{"message": "...", "field": "..."}, ...]}`."""
    if not isinstance(body, dict) or not isinstance(body.get("errors"), list):
        return None
    parts = []
    for error in body["errors"]:
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            field = error.get("field")
            parts.append(f"{field}: {error['message']}" if field else error["message"])
    return "; ".join(parts) or None


def account_refused(status: int, body: Any) -> bool:
    """Whether an answer refuses the account rather than the message: 401 and 403.

    SendGrid: 401 "The provided authorization grant is invalid, expired, or revoked", 403
    "The from address does not match a verified Sender Identity" (Twilio errors 60604, 60222;
    support.sendgrid.com "4XX API Errors and Troubleshooting Suggestions"). Resend: see
    `resend_account_refused`.
    """
    return status in (401, 403)


def raise_for_response(
    response: httpx.Response,
    *,
    provider: str,
    secret: SecretStr | None,
    error_message: Callable[[Any], str | None],
    transient_statuses: frozenset[int] = frozenset(),
    is_account_fault: Callable[[int, Any], bool] = account_refused,
) -> None:
    """Raise the worker error a non-2xx answer means; return for 2xx."""
    status = response.status_code
    if 200 <= status < 300:
        return
    body = _json_or_none(response)
    detail = error_message(body) or response.reason_phrase or "no detail"
    detail = redact(" ".join(detail.split()), secret)[:MAX_ERROR_MESSAGE_CHARS]
    message = f"{provider} answered {status}: {detail}"
    if status == 429:
        raise RateLimited(message, retry_after_s(response))
    if is_account_fault(status, body):
        raise ProviderFault(message, PROVIDER_FAULT_PAUSE_S)
    if status >= 500 or status in transient_statuses:
        raise TransientError(message)
    raise PermanentError(message)


def transport_error(
    exc: httpx.TransportError, *, provider: str, secret: SecretStr | None
) -> TransientError:
    """The worker error for a failed exchange: did the request possibly reach the provider?"""
    # Exactly these say the request never left: no connection, none free in the pool, or a URL
    # we cannot speak. Everything else (read/write timeout, dropped or reset connection,
    # protocol error) may have happened after the provider read the request.
    certain = (
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.PoolTimeout,
        httpx.UnsupportedProtocol,
    )
    detail = redact(f"{type(exc).__name__}: {exc}".rstrip(": "), secret)[:MAX_ERROR_MESSAGE_CHARS]
    if isinstance(exc, certain):
        return TransientError(f"{provider} unreachable, nothing was sent ({detail})")
    return DeliveryUnknown(f"{provider} request failed after it may have been sent ({detail})")

"""Resend: `POST {base}/emails` (https://resend.com/docs/api-reference/emails/send-email).

The idempotency key travels as `Idempotency-Key`: Resend answers a repeat within 24 hours with
the first message's id and sends nothing, so resending after an ambiguous failure is safe
(https://resend.com/docs/dashboard/emails/idempotency-keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr

from worker.email_providers.base import (
    DeliveryUnknown,
    OutgoingEmail,
    raise_for_response,
    resend_account_refused,
    resend_error_message,
    transport_error,
)
from worker.errors import PermanentError, TransientError

# Resend accepts keys of 1-256 characters; longer ones are a 400 `invalid_idempotency_key`.
MAX_IDEMPOTENCY_KEY_CHARS = 256


@dataclass(frozen=True, slots=True)
class ResendProvider:
    """Sends through Resend's REST API on a shared client."""

    http: httpx.AsyncClient = field(repr=False)
    api_key: SecretStr
    base_url: str = "https://api.resend.com"
    name: str = "resend"

    async def send(self, email: OutgoingEmail, idempotency_key: str) -> str:
        if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            # Resend would answer 400 invalid_idempotency_key; say so without the round trip.
            raise PermanentError(
                f"resend: idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters, "
                f"got {len(idempotency_key)}"
            )
        payload: dict[str, Any] = {
            "from": email.sender,
            "to": list(email.to),
            "subject": email.subject,
            "html": email.html,
        }
        if email.text is not None:
            payload["text"] = email.text
        if email.headers:
            # Resend's `headers` object: https://resend.com/docs/api-reference/emails/send-email
            # (and .../dashboard/emails/add-unsubscribe-to-transactional-emails for RFC 8058).
            payload["headers"] = dict(email.headers)
        headers = {
            "Authorization": f"Bearer {self.api_key.get_secret_value()}",
            "Idempotency-Key": idempotency_key,
        }
        try:
            response = await self.http.post(
                f"{self.base_url}/emails", json=payload, headers=headers
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, provider=self.name, secret=self.api_key) from None
        if (
            response.status_code == 409
            and _error_name(response) == "concurrent_idempotent_requests"
        ):
            # The first attempt is still in flight at Resend: asking again later is safe.
            raise TransientError("resend answered 409: the same idempotency key is in flight")
        raise_for_response(
            response,
            provider=self.name,
            secret=self.api_key,
            error_message=resend_error_message,
            is_account_fault=resend_account_refused,
        )
        try:
            message_id = response.json()["id"]
        except (ValueError, KeyError, TypeError):
            message_id = None
        if not isinstance(message_id, str) or not message_id:
            # Accepted but we cannot prove it; a resend with the same key is deduplicated.
            raise DeliveryUnknown(f"resend answered {response.status_code} without a message id")
        return message_id


def _error_name(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    name = body.get("name") if isinstance(body, dict) else None
    return name if isinstance(name, str) else None

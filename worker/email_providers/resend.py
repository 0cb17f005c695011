"""Resend: `POST {base}/emails` (https://resend.com/docs/api-reference/emails/send-email) and
`POST {base}/emails/batch` (https://resend.com/docs/api-reference/emails/send-batch-emails).

The idempotency key travels as `Idempotency-Key`: Resend answers a repeat within 24 hours with
the first answer and sends nothing, so resending after an ambiguous failure is safe
(https://resend.com/docs/dashboard/emails/idempotency-keys); the batch endpoint takes one key
for the whole request. The same key with another body is a 409 `invalid_idempotent_request`.

A batch carries up to 100 emails of the `/emails` shape (no attachments or `scheduled_at`; we
use neither). With `x-batch-validation: permissive` an invalid member fails alone: the answer is
`{"data": [{"id": ...}, ...], "errors": [{"index": i, "message": "..."}]}`, `data` holding the
ids of the accepted members in request order (https://resend.com/changelog/batch-validation-modes;
resend-node `src/batch/batch.ts` sends that header, resend-rs types the answer as
`SendEmailBatchPermissiveResponse`). Without the header (strict) one bad member fails all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr

from worker.email_providers.base import (
    MAX_ERROR_MESSAGE_CHARS,
    DeliveryUnknown,
    MemberAnswer,
    OutgoingEmail,
    raise_for_response,
    redact,
    resend_account_refused,
    resend_error_message,
    transport_error,
)
from worker.errors import PermanentError, TransientError

# Resend accepts keys of 1-256 characters; longer ones are a 400 `invalid_idempotency_key`.
MAX_IDEMPOTENCY_KEY_CHARS = 256
# "up to 100 emails in a single API call" (send-batch-emails).
MAX_BATCH_EMAILS = 100


def email_payload(email: OutgoingEmail) -> dict[str, Any]:
    """One email as `/emails` (and each member of `/emails/batch`) takes it."""
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
    return payload


@dataclass(frozen=True, slots=True)
class ResendProvider:
    """Sends through Resend's REST API on a shared client."""

    http: httpx.AsyncClient = field(repr=False)
    api_key: SecretStr
    base_url: str = "https://api.resend.com"
    name: str = "resend"
    max_batch: int = MAX_BATCH_EMAILS

    async def send(self, email: OutgoingEmail, idempotency_key: str) -> str:
        response = await self._post("/emails", email_payload(email), idempotency_key, {})
        try:
            message_id = response.json()["id"]
        except (ValueError, KeyError, TypeError):
            message_id = None
        if not isinstance(message_id, str) or not message_id:
            # Accepted but we cannot prove it; a resend with the same key is deduplicated.
            raise DeliveryUnknown(f"resend answered {response.status_code} without a message id")
        return message_id

    async def send_batch(
        self, emails: Sequence[OutgoingEmail], idempotency_key: str
    ) -> list[MemberAnswer]:
        """One request; each member's id, or its own refusal (permissive validation)."""
        if not 1 <= len(emails) <= self.max_batch:
            raise ValueError(f"a Resend batch holds 1-{self.max_batch} emails, got {len(emails)}")
        body = [email_payload(email) for email in emails]
        permissive = {"x-batch-validation": "permissive"}
        response = await self._post("/emails/batch", body, idempotency_key, permissive)
        return self._members(response, len(emails))

    def _members(self, response: httpx.Response, count: int) -> list[MemberAnswer]:
        try:
            answer = response.json()
            ids = [entry["id"] for entry in answer["data"]]
            errors = {
                int(e["index"]): str(e.get("message", "")) for e in answer.get("errors") or []
            }
        except (ValueError, KeyError, TypeError):
            raise DeliveryUnknown(
                f"resend answered {response.status_code} with a batch answer we cannot read"
            ) from None
        if (
            not all(isinstance(i, str) and i for i in ids)
            or len(ids) + len(errors) != count
            or not errors.keys() <= set(range(count))  # an index past the batch, or repeated
        ):
            raise DeliveryUnknown(
                f"resend answered {len(ids)} ids and {len(errors)} errors for {count} emails"
            )
        accepted = iter(ids)
        members: list[MemberAnswer] = []
        for index in range(count):
            if index in errors:
                detail = redact(" ".join(errors[index].split()), self.api_key)
                detail = detail[:MAX_ERROR_MESSAGE_CHARS] or "no detail"
                members.append(PermanentError(f"resend refused this email: {detail}"))
            else:
                members.append(next(accepted))
        return members

    async def _post(
        self, path: str, body: Any, idempotency_key: str, extra: dict[str, str]
    ) -> httpx.Response:
        if not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            # Resend would answer 400 invalid_idempotency_key; say so without the round trip.
            raise PermanentError(
                f"resend: idempotency key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} characters, "
                f"got {len(idempotency_key)}"
            )
        headers = {
            "Authorization": f"Bearer {self.api_key.get_secret_value()}",
            "Idempotency-Key": idempotency_key,
            **extra,
        }
        try:
            response = await self.http.post(f"{self.base_url}{path}", json=body, headers=headers)
        except httpx.TransportError as exc:
            raise transport_error(exc, provider=self.name, secret=self.api_key) from None
        if (
            response.status_code == 409
            and _error_name(response) == "concurrent_idempotent_requests"
        ):
            # The first attempt is still in flight at Resend: asking again later is safe.
            raise TransientError("resend answered 409: the same idempotency key is in flight")
        try:
            raise_for_response(
                response,
                provider=self.name,
                secret=self.api_key,
                error_message=resend_error_message,
                is_account_fault=resend_account_refused,
            )
        except TransientError as exc:
            if response.status_code >= 500:
                # A 5xx may come after Resend accepted the request: only a resend under the
                # same key (and body) is safe, which is what DeliveryUnknown asks for.
                raise DeliveryUnknown(str(exc)) from None
            raise
        return response


def _error_name(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    name = body.get("name") if isinstance(body, dict) else None
    return name if isinstance(name, str) else None

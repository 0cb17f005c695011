"""SendGrid mail: `POST {base}/v3/mail/send` with the v3 JSON body, 202 + `X-Message-Id`.

https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send. SendGrid has no
idempotency key: a `DeliveryUnknown` from this provider must not be resent blindly. The key
still travels in `custom_args` so a message found in SendGrid's activity can be traced back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr

from worker.email_providers.base import (
    OutgoingEmail,
    raise_for_response,
    sendgrid_error_message,
    split_address,
    transport_error,
)
from worker.errors import PermanentError

IDEMPOTENCY_CUSTOM_ARG = "c360_idempotency_key"


def _address(address: str) -> dict[str, str]:
    name, addr = split_address(address)
    return {"email": addr, "name": name} if name else {"email": addr}


def mail_send_body(email: OutgoingEmail, idempotency_key: str) -> dict[str, Any]:
    """The v3 mail/send JSON for one email."""
    content = []
    # SendGrid rejects the request unless text/plain, when present, comes first.
    if email.text is not None:
        content.append({"type": "text/plain", "value": email.text})
    content.append({"type": "text/html", "value": email.html})
    body: dict[str, Any] = {
        "personalizations": [{"to": [_address(a) for a in email.to]}],
        "from": _address(email.sender),
        "subject": email.subject,
        "content": content,
        "custom_args": {IDEMPOTENCY_CUSTOM_ARG: idempotency_key},
    }
    if email.headers:
        # The top-level `headers` object of mail/send ("key/value pairs of header names and
        # the value to substitute for them"), the whole message's, like `subject` here.
        body["headers"] = dict(email.headers)
    return body


@dataclass(frozen=True, slots=True)
class SendGridProvider:
    """Sends through SendGrid's v3 mail/send on a shared client."""

    http: httpx.AsyncClient = field(repr=False)
    api_key: SecretStr
    base_url: str = "https://api.sendgrid.com"
    name: str = "sendgrid"

    async def send(self, email: OutgoingEmail, idempotency_key: str) -> str:
        """Returns the `X-Message-Id`; "" if SendGrid accepted (202) but sent none."""
        try:
            body = mail_send_body(email, idempotency_key)
        except ValueError as exc:  # an address SendGrid's JSON cannot carry: retrying won't help
            raise PermanentError(f"sendgrid: {exc}") from None
        headers = {"Authorization": f"Bearer {self.api_key.get_secret_value()}"}
        try:
            response = await self.http.post(
                f"{self.base_url}/v3/mail/send", json=body, headers=headers
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, provider=self.name, secret=self.api_key) from None
        raise_for_response(
            response, provider=self.name, secret=self.api_key, error_message=sendgrid_error_message
        )
        # A 2xx is an acceptance whatever else is missing: never report it as a failure,
        # or the message would be sent again.
        return str(response.headers.get("x-message-id", ""))

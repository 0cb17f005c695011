"""SendGrid Marketing Contacts upserts (`PUT {base}/v3/marketing/contacts`), or nothing.

https://www.twilio.com/docs/sendgrid/api-reference/contacts/add-or-update-a-contact: at most
30,000 contacts a call; SendGrid answers 202 with a `job_id` and imports asynchronously. The
upsert is idempotent, so every transient failure (including `DeliveryUnknown`) may be retried.

The job drives `upsert_batch` over `batches(...)` and checkpoints after each, so a daily sync
resumes from the last synced batch; `upsert_contacts` is the one-shot convenience.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from pydantic import SecretStr

from worker.email_providers.base import raise_for_response, sendgrid_error_message, transport_error
from worker.settings import Settings

log = logging.getLogger("worker.marketing")

MAX_CONTACTS_PER_CALL = 30_000


@dataclass(frozen=True, slots=True)
class MarketingContact:
    email: str
    first_name: str | None = None
    last_name: str | None = None

    def as_json(self) -> dict[str, str]:
        # Absent names are omitted, not sent as null: an upsert then keeps what SendGrid has.
        body = {"email": self.email}
        if self.first_name:
            body["first_name"] = self.first_name
        if self.last_name:
            body["last_name"] = self.last_name
        return body


def batches(
    contacts: Sequence[MarketingContact], size: int = MAX_CONTACTS_PER_CALL
) -> Iterator[Sequence[MarketingContact]]:
    """Consecutive slices of at most `size` contacts (`size` capped at the API's maximum)."""
    if not 1 <= size <= MAX_CONTACTS_PER_CALL:
        raise ValueError(f"batch size must be 1-{MAX_CONTACTS_PER_CALL}, got {size}")
    for start in range(0, len(contacts), size):
        yield contacts[start : start + size]


class MarketingProvider(Protocol):
    @property
    def name(self) -> str: ...

    async def upsert_batch(self, contacts: Sequence[MarketingContact]) -> str | None:
        """Upsert at most MAX_CONTACTS_PER_CALL contacts; the provider's job id (None: no-op)."""
        ...

    async def upsert_contacts(self, contacts: Sequence[MarketingContact]) -> list[str]:
        """Upsert any number, split into calls; the job ids, one per call."""
        ...


@dataclass(frozen=True, slots=True)
class NoMarketing:
    """`MARKETING_PROVIDER=none`: log and do nothing."""

    name: str = "none"

    async def upsert_batch(self, contacts: Sequence[MarketingContact]) -> str | None:
        log.info("marketing provider is none: %d contact(s) not synced", len(contacts))
        return None

    async def upsert_contacts(self, contacts: Sequence[MarketingContact]) -> list[str]:
        await self.upsert_batch(contacts)
        return []


@dataclass(frozen=True, slots=True)
class SendGridMarketing:
    http: httpx.AsyncClient = field(repr=False)
    api_key: SecretStr
    base_url: str = "https://api.sendgrid.com"
    max_contacts_per_call: int = MAX_CONTACTS_PER_CALL
    name: str = "sendgrid"

    async def upsert_batch(self, contacts: Sequence[MarketingContact]) -> str:
        if not 1 <= len(contacts) <= self.max_contacts_per_call:
            raise ValueError(
                f"a batch holds 1-{self.max_contacts_per_call} contacts, got {len(contacts)}"
            )
        payload: dict[str, Any] = {"contacts": [c.as_json() for c in contacts]}
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Authorization": f"Bearer {self.api_key.get_secret_value()}",
            "Content-Type": "application/json",
            # With a length given, httpx sends the streamed body as-is rather than chunked.
            "Content-Length": str(len(body)),
        }
        try:
            response = await self.http.put(
                f"{self.base_url}/v3/marketing/contacts", content=_chunks(body), headers=headers
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, provider="sendgrid marketing", secret=self.api_key) from None
        raise_for_response(
            response,
            provider="sendgrid marketing",
            secret=self.api_key,
            error_message=sendgrid_error_message,
        )
        try:
            job_id = response.json().get("job_id")
        except (ValueError, AttributeError):
            job_id = None
        return job_id if isinstance(job_id, str) else ""

    async def upsert_contacts(self, contacts: Sequence[MarketingContact]) -> list[str]:
        return [
            await self.upsert_batch(batch)
            for batch in batches(contacts, self.max_contacts_per_call)
        ]


async def _chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    # A full batch is ~2 MB of JSON. Streamed in slices, it is written as the socket drains
    # instead of as one buffer (aiohttp warns about raw bodies over 1 MiB for that reason).
    for start in range(0, len(body), size):
        yield body[start : start + size]


def make_marketing_provider(settings: Settings, http: httpx.AsyncClient) -> MarketingProvider:
    """The provider `MARKETING_PROVIDER` names, on the process's shared client."""
    if settings.marketing_provider == "none":
        return NoMarketing()
    if settings.marketing_api_key is None:  # Settings validates this already
        raise ValueError("MARKETING_API_KEY is required for MARKETING_PROVIDER=sendgrid")
    return SendGridMarketing(
        http=http, api_key=settings.marketing_api_key, base_url=settings.marketing_base_url
    )

"""SendGrid Marketing Contacts upserts (`PUT {base}/v3/marketing/contacts`), or nothing.

https://www.twilio.com/docs/sendgrid/api-reference/contacts/add-or-update-a-contact: at most
30,000 contacts a call; SendGrid answers 202 with a `job_id` and imports asynchronously. The
upsert is idempotent, so every transient failure (including `DeliveryUnknown`) may be retried.

Removal (someone unsubscribed) is two calls, both idempotent: `POST .../contacts/search/emails`
`{"emails": [...]}` (at most 100; 200 with `{"result": {email: {"contact": {"id": ...}} or
{"error": ...}}}`, 404 when none is known) finds the contact ids, and
`DELETE .../contacts?ids=a,b` deletes them (202 with a `job_id`, processed asynchronously):
https://www.twilio.com/docs/sendgrid/api-reference/contacts/get-contacts-by-emails and
.../contacts/delete-contacts. Deleting the contact, not a global suppression
(`/v3/asm/suppressions/global`), is deliberate: a global suppression would also stop the
welcome and trial mail a SendGrid mail provider sends to the same address.

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
# The search-by-emails limit; the delete call takes the ids one search found.
MAX_EMAILS_PER_SEARCH = 100


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

    async def remove_batch(self, emails: Sequence[str]) -> int:
        """Delete at most MAX_EMAILS_PER_SEARCH addresses' contacts; how many were found."""
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

    async def remove_batch(self, emails: Sequence[str]) -> int:
        log.info("marketing provider is none: %d contact(s) not removed", len(emails))
        return 0


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
        response = await self._request(
            "PUT",
            "/v3/marketing/contacts",
            # With a length given, httpx sends the streamed body as-is rather than chunked.
            content=_chunks(body),
            headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
        )
        return _job_id(response)

    async def remove_batch(self, emails: Sequence[str]) -> int:
        if not 1 <= len(emails) <= MAX_EMAILS_PER_SEARCH:
            raise ValueError(f"a removal holds 1-{MAX_EMAILS_PER_SEARCH} emails, got {len(emails)}")
        found = await self._request(
            "POST",
            "/v3/marketing/contacts/search/emails",
            json={"emails": list(emails)},
            not_found_ok=True,
        )
        ids = _found_ids(found) if found.status_code == 200 else []
        if ids:
            await self._request("DELETE", "/v3/marketing/contacts", params={"ids": ",".join(ids)})
        return len(ids)

    async def _request(
        self, method: str, path: str, *, not_found_ok: bool = False, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key.get_secret_value()}"}
        headers |= kwargs.pop("headers", {})
        try:
            response = await self.http.request(
                method, f"{self.base_url}{path}", headers=headers, **kwargs
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, provider="sendgrid marketing", secret=self.api_key) from None
        if not (not_found_ok and response.status_code == 404):
            raise_for_response(
                response,
                provider="sendgrid marketing",
                secret=self.api_key,
                error_message=sendgrid_error_message,
            )
        return response

    async def upsert_contacts(self, contacts: Sequence[MarketingContact]) -> list[str]:
        return [
            await self.upsert_batch(batch)
            for batch in batches(contacts, self.max_contacts_per_call)
        ]


def _job_id(response: httpx.Response) -> str:
    try:
        job_id = response.json().get("job_id")
    except (ValueError, AttributeError):
        job_id = None
    return job_id if isinstance(job_id, str) else ""


def _found_ids(response: httpx.Response) -> list[str]:
    """The contact ids of a search-by-emails answer (addresses not found carry an `error`)."""
    try:
        result = response.json().get("result")
    except (ValueError, AttributeError):
        return []
    if not isinstance(result, dict):
        return []
    ids = []
    for match in result.values():
        contact = match.get("contact") if isinstance(match, dict) else None
        contact_id = contact.get("id") if isinstance(contact, dict) else None
        if isinstance(contact_id, str) and contact_id:
            ids.append(contact_id)
    return ids


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

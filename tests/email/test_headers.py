"""Extra email headers: sent in each provider's `headers` field, never with a line break."""

from __future__ import annotations

import httpx
import pytest
from pydantic import SecretStr

from jobs.email.outbox import Draft
from tests.support.provider_server import ProviderServer
from worker.email_providers import OutgoingEmail, ResendProvider, SendGridProvider

from .conftest import API_KEY

ONE_CLICK = {
    "List-Unsubscribe": "<https://app.contact360.test/email/unsubscribe/tok>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
}


def email(headers: dict[str, str]) -> OutgoingEmail:
    return OutgoingEmail(
        sender="Contact360 <no-reply@contact360.test>",
        to=("ada@example.com",),
        subject="Step 1",
        html="<p>Hi</p>",
        headers=headers,
    )


async def test_resend_and_sendgrid_send_the_headers_in_their_headers_field(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    key, base = SecretStr(API_KEY), provider_server.base_url
    await ResendProvider(http=http, api_key=key, base_url=base).send(email(ONE_CLICK), "k/1")
    await SendGridProvider(http=http, api_key=key, base_url=base).send(email(ONE_CLICK), "k/2")
    resend, sendgrid = provider_server.requests
    assert resend.json["headers"] == ONE_CLICK
    assert sendgrid.json["headers"] == ONE_CLICK
    # Without headers the field is left out, as before.
    provider_server.reset()
    await ResendProvider(http=http, api_key=key, base_url=base).send(email({}), "k/3")
    assert "headers" not in provider_server.requests[0].json


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("List-Unsubscribe", "<https://x.test/u>\r\nBcc: victim@example.com"),
        ("List-Unsubscribe", "<https://x.test/u>\nBcc: victim@example.com"),
        ("List-Unsubscribe", "<https://x.test/u>\rX: y"),
        ("List-Unsubscribe", "a\x00b"),
        ("List-Unsubscribe", "a\tb\x7f"),
        ("X-Evil\r\nBcc", "victim@example.com"),
        ("X-Evil: injected", "v"),
        ("X Evil", "v"),
        ("", "v"),
        ("Bcc", "victim@example.com"),
        ("subject", "another subject"),
        ("X-Long", "v" * 999),
    ],
)
def test_an_unsafe_header_is_refused_before_anything_is_stored_or_sent(
    name: str, value: str
) -> None:
    with pytest.raises(ValueError, match="email header"):
        email({name: value})
    with pytest.raises(ValueError, match="email header"):
        Draft("caller/k", "ada@example.com", "s", "<p>h</p>", None, {name: value})

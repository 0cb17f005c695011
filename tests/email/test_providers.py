"""Email and marketing adapters against the loopback provider: wire format and error mapping."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.support.provider_server import (
    RESEND_EMAILS,
    SENDGRID_CONTACTS,
    SENDGRID_MAIL,
    Answer,
    ProviderServer,
)
from worker.email_providers import (
    ConsoleProvider,
    DeliveryUnknown,
    OutgoingEmail,
    ResendProvider,
    SendGridProvider,
    make_email_provider,
    safe_to_resend,
)
from worker.email_providers.base import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    retry_after_s,
)
from worker.errors import PermanentError, RateLimited, TransientError
from worker.http import DEFAULT_TIMEOUT, make_http_client
from worker.marketing import (
    MAX_CONTACTS_PER_CALL,
    MarketingContact,
    NoMarketing,
    SendGridMarketing,
    make_marketing_provider,
)
from worker.settings import Settings

from .conftest import TEST_TIMEOUT

API_KEY = "re_test_Sup3rSecretKeyValue_4242"
EMAIL = OutgoingEmail(
    sender="Contact360 <no-reply@contact360.test>",
    to=("ada@example.com", "Bob Stone <bob@example.com>"),
    subject="Welcome, Ada",
    html="<p>Hello <b>Ada</b></p>",
    text="Hello Ada",
)


def resend(http: httpx.AsyncClient, server: ProviderServer) -> ResendProvider:
    return ResendProvider(http=http, api_key=SecretStr(API_KEY), base_url=server.base_url)


def sendgrid(http: httpx.AsyncClient, server: ProviderServer) -> SendGridProvider:
    return SendGridProvider(http=http, api_key=SecretStr(API_KEY), base_url=server.base_url)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


# ---- Resend ------------------------------------------------------------------------------------


async def test_resend_wire_format(http: httpx.AsyncClient, provider_server: ProviderServer) -> None:
    message_id = await resend(http, provider_server).send(EMAIL, "welcome/42")

    [request] = provider_server.requests
    assert (request.method, request.path) == ("POST", RESEND_EMAILS)
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Idempotency-Key"] == "welcome/42"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json == {
        "from": "Contact360 <no-reply@contact360.test>",
        "to": ["ada@example.com", "Bob Stone <bob@example.com>"],
        "subject": "Welcome, Ada",
        "html": "<p>Hello <b>Ada</b></p>",
        "text": "Hello Ada",
    }
    [delivery] = provider_server.delivered
    assert message_id == delivery.provider_id


async def test_resend_omits_absent_text(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    email = OutgoingEmail("a@x.test", ("b@x.test",), "s", "<p>h</p>")
    await resend(http, provider_server).send(email, "k")
    assert provider_server.requests[0].json == {
        "from": "a@x.test",
        "to": ["b@x.test"],
        "subject": "s",
        "html": "<p>h</p>",
    }


async def test_resend_same_key_is_delivered_once(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    provider = resend(http, provider_server)
    first = await provider.send(EMAIL, "waitlist/7/1")
    second = await provider.send(EMAIL, "waitlist/7/1")
    assert first == second
    assert len(provider_server.requests) == 2
    assert len(provider_server.delivered) == 1


async def test_resend_same_key_other_payload_is_permanent(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    provider = resend(http, provider_server)
    await provider.send(EMAIL, "k")
    other = OutgoingEmail(EMAIL.sender, EMAIL.to, "another subject", EMAIL.html)
    with pytest.raises(PermanentError) as info:
        await provider.send(other, "k")
    assert str(info.value) == (
        "resend answered 409: invalid_idempotent_request: Same idempotency key used with a "
        "different request payload. Change your idempotency key or payload."
    )


async def test_resend_concurrent_same_key_is_transient(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    body = {"statusCode": 409, "name": "concurrent_idempotent_requests", "message": "wait"}
    provider_server.script(RESEND_EMAILS, Answer(status=409, body=body))
    with pytest.raises(TransientError) as info:
        await resend(http, provider_server).send(EMAIL, "k")
    assert type(info.value) is TransientError


async def test_resend_429_retry_after(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    provider_server.script(
        RESEND_EMAILS,
        Answer(
            status=429,
            headers={"retry-after": "7", "ratelimit-reset": "7"},
            body={"statusCode": 429, "name": "rate_limit_exceeded", "message": "Too many requests"},
        ),
    )
    with pytest.raises(RateLimited) as info:
        await resend(http, provider_server).send(EMAIL, "k")
    assert info.value.retry_after_s == 7.0
    assert str(info.value) == "resend answered 429: rate_limit_exceeded: Too many requests"


async def test_resend_422_is_permanent_with_message(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    body = {
        "statusCode": 422,
        "name": "validation_error",
        "message": "  Invalid `to` field.\n  The email address needs to follow the format.  ",
    }
    provider_server.script(RESEND_EMAILS, Answer(status=422, body=body))
    with pytest.raises(PermanentError) as info:
        await resend(http, provider_server).send(EMAIL, "k")
    assert str(info.value) == (
        "resend answered 422: validation_error: Invalid `to` field. "
        "The email address needs to follow the format."
    )


async def test_5xx_is_transient_then_success(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    provider_server.script(RESEND_EMAILS, Answer(status=500, body=b"upstream broke"))
    provider = resend(http, provider_server)
    with pytest.raises(TransientError) as info:
        await provider.send(EMAIL, "k")
    # Resend may have accepted before its 5xx: only the same request under the same key may
    # go again, which is what DeliveryUnknown asks of the outbox.
    assert type(info.value) is DeliveryUnknown
    assert str(info.value) == "resend answered 500: Internal Server Error"
    assert await provider.send(EMAIL, "k") == provider_server.delivered[0].provider_id
    assert len(provider_server.requests) == 2


@pytest.mark.parametrize("make", [resend, sendgrid])
async def test_hang_is_delivery_unknown_within_timeout(
    make: object, http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    assert callable(make)
    provider_server.script(RESEND_EMAILS, Answer(hang=True))
    provider_server.script(SENDGRID_MAIL, Answer(hang=True))
    started = time.monotonic()
    with pytest.raises(DeliveryUnknown) as info:
        await make(http, provider_server).send(EMAIL, "k")
    elapsed_s = time.monotonic() - started
    assert "ReadTimeout" in str(info.value)
    # The server would hang for 120 s: we gave up on our own read timeout (1 s), not its.
    assert TEST_TIMEOUT.read is not None
    assert TEST_TIMEOUT.read * 0.9 <= elapsed_s < TEST_TIMEOUT.read + 5
    assert len(provider_server.requests) == 1


async def test_connection_dropped_after_sending_is_delivery_unknown(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    provider_server.script(SENDGRID_MAIL, Answer(drop=True))
    with pytest.raises(DeliveryUnknown) as info:
        await sendgrid(http, provider_server).send(EMAIL, "k")
    assert "RemoteProtocolError" in str(info.value)
    assert len(provider_server.requests) == 1


@pytest.mark.parametrize("make", [resend, sendgrid])
async def test_connection_refused_is_transient_not_unknown(
    make: object, http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    assert callable(make)
    provider = type(make(http, provider_server))(
        http=http, api_key=SecretStr(API_KEY), base_url=closed_port_url()
    )
    with pytest.raises(TransientError) as info:
        await provider.send(EMAIL, "k")
    assert not isinstance(info.value, DeliveryUnknown)
    assert "ConnectError" in str(info.value)
    assert "nothing was sent" in str(info.value)


# ---- SendGrid ----------------------------------------------------------------------------------


async def test_sendgrid_wire_format(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    message_id = await sendgrid(http, provider_server).send(EMAIL, "welcome/42")

    [request] = provider_server.requests
    assert (request.method, request.path) == ("POST", SENDGRID_MAIL)
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert "Idempotency-Key" not in request.headers
    assert request.json == {
        "personalizations": [
            {
                "to": [
                    {"email": "ada@example.com"},
                    {"email": "bob@example.com", "name": "Bob Stone"},
                ]
            }
        ],
        "from": {"email": "no-reply@contact360.test", "name": "Contact360"},
        "subject": "Welcome, Ada",
        "content": [
            {"type": "text/plain", "value": "Hello Ada"},
            {"type": "text/html", "value": "<p>Hello <b>Ada</b></p>"},
        ],
        "custom_args": {"c360_idempotency_key": "welcome/42"},
    }
    [delivery] = provider_server.delivered
    assert message_id == delivery.provider_id
    assert len(message_id) == 22


async def test_sendgrid_html_only(http: httpx.AsyncClient, provider_server: ProviderServer) -> None:
    email = OutgoingEmail("a@x.test", ("b@x.test",), "s", "<p>h</p>")
    await sendgrid(http, provider_server).send(email, "k")
    assert provider_server.requests[0].json["content"] == [
        {"type": "text/html", "value": "<p>h</p>"}
    ]
    assert provider_server.requests[0].json["from"] == {"email": "a@x.test"}


async def test_unsendable_input_is_permanent_without_a_request(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    bad_recipient = OutgoingEmail(EMAIL.sender, ["Bob Stone <>"], "s", "<p>h</p>")
    with pytest.raises(PermanentError) as info:
        await sendgrid(http, provider_server).send(bad_recipient, "k")
    assert str(info.value) == "sendgrid: not an email address: 'Bob Stone <>'"
    with pytest.raises(PermanentError) as info:
        await resend(http, provider_server).send(EMAIL, "k" * 257)
    assert str(info.value) == "resend: idempotency key must be 1-256 characters, got 257"
    assert provider_server.requests == []


async def test_sendgrid_429_rate_limit_reset(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    reset_unix_s = int(time.time()) + 30
    provider_server.script(
        SENDGRID_MAIL,
        Answer(
            status=429,
            headers={
                "X-RateLimit-Limit": "150",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(reset_unix_s),
            },
            body={"errors": [{"field": None, "message": "too many requests"}]},
        ),
    )
    with pytest.raises(RateLimited) as info:
        await sendgrid(http, provider_server).send(EMAIL, "k")
    # The header is a Unix time: the wait is what is left of it (the clock moved a little).
    assert 27.0 <= info.value.retry_after_s <= 30.0
    assert str(info.value) == "sendgrid answered 429: too many requests"


async def test_sendgrid_400_carries_every_error_message(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    body = {
        "errors": [
            {"message": "The from email does not contain a valid address.", "field": "from.email"},
            {"message": "Invalid type. Expected: object.", "field": None},
        ]
    }
    provider_server.script(SENDGRID_MAIL, Answer(status=400, body=body))
    with pytest.raises(PermanentError) as info:
        await sendgrid(http, provider_server).send(EMAIL, "k")
    assert str(info.value) == (
        "sendgrid answered 400: from.email: The from email does not contain a valid address.; "
        "Invalid type. Expected: object."
    )


def test_retry_after_header_styles() -> None:
    request = httpx.Request("POST", "http://x/emails")

    def wait(headers: dict[str, str]) -> float:
        return retry_after_s(httpx.Response(429, headers=headers, request=request), now_s=1000.0)

    assert wait({"retry-after": "2.5"}) == 2.5
    assert wait({"X-RateLimit-Reset": "1012"}) == 12.0
    assert wait({"X-RateLimit-Reset": "990"}) == 0.0  # already passed
    assert wait({"retry-after": "86400"}) == MAX_RETRY_AFTER_S
    assert wait({}) == DEFAULT_RETRY_AFTER_S
    # An HTTP-date (RFC 9110 allows it): 1,010 s after the epoch is 10 s after now_s.
    assert wait({"retry-after": "Thu, 01 Jan 1970 00:16:50 GMT"}) == 10.0
    assert wait({"retry-after": "soon"}) == DEFAULT_RETRY_AFTER_S
    assert wait({"retry-after": "3", "X-RateLimit-Reset": "2000"}) == 3.0


# ---- secrets -----------------------------------------------------------------------------------


async def test_api_key_never_in_errors_reprs_or_logs(
    http: httpx.AsyncClient, provider_server: ProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A provider that echoes the credential back must not leak it through our error message.
    echo = {"statusCode": 401, "name": "unauthorized", "message": f"API key {API_KEY} is invalid"}
    provider_server.script(RESEND_EMAILS, Answer(status=401, body=echo), Answer(hang=True))
    provider_server.script(
        SENDGRID_MAIL,
        Answer(status=429, body={"errors": [{"message": f"key {API_KEY} throttled"}]}),
        Answer(status=500),
    )
    errors: list[Exception] = []
    for provider in (resend(http, provider_server), sendgrid(http, provider_server)):
        for _ in range(2):
            with pytest.raises((TransientError, PermanentError)) as info:
                await provider.send(EMAIL, "k")
            errors.append(info.value)
    refused = ResendProvider(http=http, api_key=SecretStr(API_KEY), base_url=closed_port_url())
    with pytest.raises(TransientError) as info:
        await refused.send(EMAIL, "k")
    errors.append(info.value)

    assert str(errors[0]) == "resend answered 401: unauthorized: API key ********** is invalid"
    texts = [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [repr(resend(http, provider_server)), repr(sendgrid(http, provider_server))]
    texts += [caplog.text]
    texts += [repr(Settings(email_provider="resend", email_api_key=SecretStr(API_KEY)))]
    assert len(texts) == 14
    for text in texts:
        assert API_KEY not in text


async def test_console_logs_recipients_and_subject_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker.email")
    message_id = await ConsoleProvider().send(EMAIL, "welcome/42")
    assert message_id.startswith("console-")
    assert len(message_id) == len("console-") + 36
    [record] = caplog.records
    assert record.getMessage() == (
        "NOT SENT (EMAIL_PROVIDER=console, nothing left this process) "
        f"id={message_id} key=welcome/42 "
        "to=ada@example.com, Bob Stone <bob@example.com> subject='Welcome, Ada'"
    )
    assert "Hello" not in caplog.text


# ---- factories ---------------------------------------------------------------------------------


async def test_make_email_provider_follows_settings(provider_server: ProviderServer) -> None:
    async with make_http_client() as http:
        console = make_email_provider(Settings(email_provider="console"), http)
        assert isinstance(console, ConsoleProvider)
        assert safe_to_resend(console)

        settings = Settings(email_provider="resend", email_api_key=SecretStr(API_KEY))
        resend_provider = make_email_provider(settings, http)
        assert isinstance(resend_provider, ResendProvider)
        assert resend_provider.base_url == "https://api.resend.com"
        assert safe_to_resend(resend_provider)

        settings = Settings(
            email_provider="sendgrid",
            email_api_key=SecretStr(API_KEY),
            email_api_base_url=provider_server.base_url + "/",
        )
        sendgrid_provider = make_email_provider(settings, http)
        assert isinstance(sendgrid_provider, SendGridProvider)
        assert sendgrid_provider.base_url == provider_server.base_url
        assert not safe_to_resend(sendgrid_provider)
        assert await sendgrid_provider.send(EMAIL, "k") == provider_server.delivered[0].provider_id


async def test_http_client_defaults() -> None:
    async with make_http_client() as http:
        assert http.timeout == DEFAULT_TIMEOUT
        assert (http.timeout.connect, http.timeout.read) == (5.0, 15.0)
        assert (http.timeout.write, http.timeout.pool) == (15.0, 5.0)
    with pytest.raises(ValueError, match="unknown HTTP transport"):
        make_http_client(transport="curl")  # type: ignore[arg-type]  # not a transport, on purpose


# ---- marketing ---------------------------------------------------------------------------------


def contacts(n: int) -> list[MarketingContact]:
    return [MarketingContact(f"user{i}@example.com", f"First{i}", f"Last{i}") for i in range(n)]


async def test_marketing_wire_format(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    marketing = SendGridMarketing(
        http=http, api_key=SecretStr(API_KEY), base_url=provider_server.base_url
    )
    job_id = await marketing.upsert_batch(
        [MarketingContact("ada@example.com", "Ada", "Lovelace"), MarketingContact("x@example.com")]
    )
    [request] = provider_server.requests
    assert (request.method, request.path) == ("PUT", SENDGRID_CONTACTS)
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Content-Length"] == str(len(request.raw_body))
    assert "Transfer-Encoding" not in request.headers
    assert request.json == {
        "contacts": [
            {"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"},
            {"email": "x@example.com"},
        ]
    }
    assert job_id == provider_server.delivered[0].provider_id


async def test_marketing_splits_at_the_limit(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    marketing = SendGridMarketing(
        http=http, api_key=SecretStr(API_KEY), base_url=provider_server.base_url
    )
    everyone = contacts(MAX_CONTACTS_PER_CALL + 1)
    job_ids = await marketing.upsert_contacts(everyone)

    sizes = [len(r.json["contacts"]) for r in provider_server.requests]
    assert sizes == [30_000, 1]
    assert provider_server.requests[1].json == {
        "contacts": [
            {"email": "user30000@example.com", "first_name": "First30000", "last_name": "Last30000"}
        ]
    }
    assert job_ids == [d.provider_id for d in provider_server.delivered]
    assert len(set(job_ids)) == 2
    with pytest.raises(ValueError, match="1-30000 contacts, got 30001"):
        await marketing.upsert_batch(everyone)


async def test_marketing_errors_map_like_email(
    http: httpx.AsyncClient, provider_server: ProviderServer
) -> None:
    marketing = SendGridMarketing(
        http=http, api_key=SecretStr(API_KEY), base_url=provider_server.base_url
    )
    provider_server.script(
        SENDGRID_CONTACTS,
        Answer(status=429, headers={"X-RateLimit-Reset": str(int(time.time()) + 5)}),
        Answer(status=400, body={"errors": [{"field": "contacts[0].email", "message": "invalid"}]}),
    )
    with pytest.raises(RateLimited):
        await marketing.upsert_batch(contacts(1))
    with pytest.raises(PermanentError) as info:
        await marketing.upsert_batch(contacts(1))
    assert str(info.value) == "sendgrid marketing answered 400: contacts[0].email: invalid"


async def test_marketing_none_logs_and_sends_nothing(
    provider_server: ProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.marketing")
    async with make_http_client() as http:
        marketing = make_marketing_provider(Settings(), http)
        assert isinstance(marketing, NoMarketing)
        assert await marketing.upsert_contacts(contacts(3)) == []
        settings = Settings(
            marketing_provider="sendgrid",
            marketing_api_key=SecretStr(API_KEY),
            marketing_api_base_url=provider_server.base_url,
        )
        assert isinstance(make_marketing_provider(settings, http), SendGridMarketing)
    assert [r.getMessage() for r in caplog.records] == [
        "marketing provider is none: 3 contact(s) not synced"
    ]
    assert provider_server.requests == []


@pytest.mark.parametrize(
    "answer",
    [
        {"data": [{"id": "a"}, {"id": "b"}], "errors": [{"index": 7, "message": "past the end"}]},
        {
            "data": [{"id": "a"}],
            "errors": [{"index": 1, "message": "x"}, {"index": 1, "message": "x"}],
        },
        {"data": [{"id": "a"}, {"id": ""}, {"id": "c"}]},
    ],
    ids=["index-past-the-batch", "index-repeated", "empty-id"],
)
async def test_a_batch_answer_that_does_not_add_up_is_delivery_unknown(answer: Any) -> None:
    # An answer no real Resend gives (a narrow unit test: MockTransport): whatever it says,
    # the flush must treat the batch as maybe-sent (resent under its key), never crash on it.
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    async with httpx.AsyncClient(transport=transport) as http:
        provider = ResendProvider(http=http, api_key=SecretStr("re_test"))
        emails = [
            OutgoingEmail(sender="C <n@x.io>", to=[f"u{i}@x.io"], subject="s", html="h")
            for i in range(3)
        ]
        with pytest.raises(DeliveryUnknown, match="resend answered"):
            await provider.send_batch(emails, "batch/k")

"""What a web app may pass to `send_email` and `join_waitlist`: refused before anything exists."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from worker.client import JobsClient

from .conftest import RECIPIENT

# The documented caps (jobs/email/caller_input.py), as a caller reads them in the README.
MAX_SUBJECT_CHARS = 998
MAX_HTML_BYTES = 256 * 1024
MAX_NAME_CHARS = 100
GOOD: dict[str, Any] = {"to": RECIPIENT, "subject": "Your export is ready", "html": "<p>Hi</p>"}


async def nothing_was_created(
    sessions: async_sessionmaker[AsyncSession], redis_raw: aioredis.Redis
) -> None:
    async with sessions() as session:
        for table in ("email_messages", "waitlist_entries"):
            assert await session.scalar(text(f"SELECT count(*) FROM {table}")) == 0
    assert await redis_raw.zcard("default") == 0
    assert [key async for key in redis_raw.scan_iter(match="arq:job:*")] == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"subject": "x" * (MAX_SUBJECT_CHARS + 1)}, "at most 998"),
        ({"subject": "Hello\r\nBcc: everyone@example.com"}, "line breaks"),
        ({"subject": "Hello\u2028there"}, "line breaks"),
        ({"subject": "  "}, "non-empty"),
        ({"html": "<p>" + "x" * MAX_HTML_BYTES + "</p>"}, "`html` is over 256 KiB"),
        ({"html": "é" * (MAX_HTML_BYTES // 2 + 1)}, "`html` is over 256 KiB"),  # UTF-8 bytes
        ({"text": "x" * (300 * 1024)}, "`text` is over 256 KiB"),
        ({"to": "not-an-address"}, "`to` is not a valid email address"),
        ({"to": "a@b.co, c@d.co"}, "`to` is not a valid email address"),
        ({"idempotency_key": "k" * 250}, "`idempotency_key` must be 1-249"),
        ({"idempotency_key": "has space"}, "printable ASCII"),
        ({"idempotency_key": "naïve"}, "printable ASCII"),
    ],
)
async def test_send_email_refuses_oversized_or_malformed_input_and_writes_nothing(
    override: dict[str, Any],
    message: str,
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    redis_raw: aioredis.Redis,
) -> None:
    with pytest.raises(ValueError, match=message):
        await jobs_client.send_email(**(GOOD | override))
    await nothing_was_created(sessions, redis_raw)


async def test_send_email_accepts_the_limits_themselves(jobs_client: JobsClient) -> None:
    enqueued = await jobs_client.send_email(
        RECIPIENT,
        "s" * MAX_SUBJECT_CHARS,
        "h" * MAX_HTML_BYTES,
        "t" * 1000,
        idempotency_key="k" * 249,
    )
    assert enqueued.job_id == "email:" + "k" * 249


# The audit's case (M4): a victim's address signed up with a message for a name, which the
# campaign would greet by in three emails from our own domain.
PHISHING_NAMES = [
    "your account is locked, verify at evil.example",
    "Ada, verify your account: https://evil.example/login",
    "see www.evil-example.com now",
    "support@evil.example",
    "Ada visit ｅｖｉｌ．ｅｘａｍｐｌｅ",  # noqa: RUF001 (full-width letters and dot are the case)
    "Ada visit evil。example",  # ideographic full stop: an IDNA label dot
    "Ada visit 203.0.113.7",
    "Ada\nYour account is locked",
    "Ada\u202egnp.exe",  # right-to-left override
    "Ada evil\u200b.example",  # a zero-width space hiding the domain from a naive filter
    "A" * (MAX_NAME_CHARS + 1),
]


@pytest.mark.parametrize("name", PHISHING_NAMES)
async def test_join_waitlist_refuses_a_name_that_carries_a_message(
    name: str,
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    redis_raw: aioredis.Redis,
) -> None:
    with pytest.raises(ValueError, match="join_waitlist: name"):
        await jobs_client.join_waitlist("victim@example.com", name=name)
    await nothing_was_created(sessions, redis_raw)


@pytest.mark.parametrize(
    "email",
    [
        "",
        "victim",
        "victim@",
        "@example.com",
        "a@b@example.com",
        "victim@-example.com",
        "victim@example.com\r\nBcc: x@example.com",
        "victim@exa mple.com",
        "ü@example.com",  # the importer's rule: ASCII (punycode) only
        "v" * 65 + "@example.com",
        "v@" + "d" * 250 + ".com",
    ],
)
async def test_join_waitlist_refuses_an_address_an_import_would_refuse(
    email: str,
    jobs_client: JobsClient,
    sessions: async_sessionmaker[AsyncSession],
    redis_raw: aioredis.Redis,
) -> None:
    with pytest.raises(ValueError, match="join_waitlist: email: "):
        await jobs_client.join_waitlist(email, name="Ada")
    await nothing_was_created(sessions, redis_raw)


@pytest.mark.parametrize(
    "name", ["Ada Lovelace", "J.R.R. Tolkien", "St. John Smith", "Zoë O'Brien-Ng", "李小龍", None]
)
async def test_join_waitlist_keeps_real_names(
    name: str | None, jobs_client: JobsClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    signup = await jobs_client.join_waitlist(
        "  Ada@Example.com ", name=f"  {name} " if name else None
    )
    assert (signup.email, signup.created) == ("ada@example.com", True)
    async with sessions() as session:
        stored = await session.scalar(text("SELECT name FROM waitlist_entries"))
    assert stored == name

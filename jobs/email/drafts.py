"""The emails the platform sends, as outbox drafts with their derived idempotency keys.

Keys name the logical email, not the attempt: `welcome/<user_id>`, `waitlist/<entry_id>/<step>`,
`waitlist-confirm/<entry_id>`, `trial-reminder/<user_id>`, `trial-expired/<user_id>` (callers'
own keys live apart, under `caller/`: jobs/email/keys.py). Whatever job or retry renders one of
these again, the outbox sends it once.

Waitlist email links are signed (worker/tokens.py) and point at APP_URL, so they need
`CampaignLinks` (APP_URL and SECRET_KEY). Every campaign step carries the RFC 8058 headers
`List-Unsubscribe: <url>` and `List-Unsubscribe-Post: List-Unsubscribe=One-Click`, with the
same URL as the body's link. Welcome and trial email link to APP_URL, or to `PRODUCT_URL`
when it is unset: they are sent either way.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import SecretStr

from jobs.email.keys import welcome_key
from jobs.email.outbox import Draft
from jobs.email.templates import render
from worker import tokens
from worker.settings import Settings

# Where transactional email links go when APP_URL is unset: the product's home page.
PRODUCT_URL = "https://app.contact360.io"
LAST_WAITLIST_STEP = 3
# How long a waitlist sign-up waits for its confirmation before it is deleted (campaign.py).
# A week covers a sign-up read after a weekend or a holiday; longer would keep addresses of
# people who never agreed to anything.
CONFIRM_TTL = timedelta(days=7)
WAITLIST_CONFIRM_PREFIX = "waitlist-confirm/"
# RFC 8058 §3.1: the POST body a one-click client sends, and the header that announces it.
ONE_CLICK = "List-Unsubscribe=One-Click"


class CampaignNotConfigured(ValueError):
    """APP_URL or SECRET_KEY is missing: no waitlist email can carry a working link."""


@dataclass(frozen=True, slots=True)
class CampaignLinks:
    """The public app's base URL and the key that signs its links."""

    app_url: str
    secret_key: SecretStr = field(repr=False)

    @classmethod
    def of(cls, settings: Settings) -> CampaignLinks:
        """Raises `CampaignNotConfigured` naming what is missing."""
        app_url, secret_key = settings.app_url, settings.secret_key
        if app_url is None or secret_key is None:
            named = (("APP_URL", app_url), ("SECRET_KEY", secret_key))
            missing = [name for name, value in named if value is None]
            raise CampaignNotConfigured(
                f"waitlist email is not sent: {' and '.join(missing)} not set (APP_URL is the "
                "public web app's base URL, SECRET_KEY signs its unsubscribe and confirm links)"
            )
        return cls(app_url, secret_key)

    def unsubscribe_url(self, entry_id: uuid.UUID) -> str:
        token = tokens.make_token(tokens.UNSUBSCRIBE, entry_id, self.secret_key)
        return tokens.link(self.app_url, tokens.UNSUBSCRIBE, token)

    def confirm_url(self, entry_id: uuid.UUID) -> str:
        token = tokens.make_token(tokens.CONFIRM_WAITLIST, entry_id, self.secret_key)
        return tokens.link(self.app_url, tokens.CONFIRM_WAITLIST, token)


def welcome(user_id: uuid.UUID, email: str, name: str | None, app_url: str | None = None) -> Draft:
    rendered = render("welcome", name=name, app_url=app_url or PRODUCT_URL)
    return Draft(welcome_key(user_id), email, rendered.subject, rendered.html, rendered.text)


def waitlist_confirmation_key(entry_id: uuid.UUID) -> str:
    return f"{WAITLIST_CONFIRM_PREFIX}{entry_id}"


def waitlist_confirmation(
    entry_id: uuid.UUID, email: str, name: str | None, links: CampaignLinks
) -> Draft:
    rendered = render(
        "waitlist_confirm",
        name=name,
        confirm_url=links.confirm_url(entry_id),
        expires_days=CONFIRM_TTL.days,
    )
    key = waitlist_confirmation_key(entry_id)
    return Draft(key, email, rendered.subject, rendered.html, rendered.text)


def waitlist_step(
    entry_id: uuid.UUID, email: str, name: str | None, step: int, links: CampaignLinks
) -> Draft:
    if not 1 <= step <= LAST_WAITLIST_STEP:
        raise ValueError(f"waitlist step must be 1-{LAST_WAITLIST_STEP}, got {step}")
    unsubscribe_url = links.unsubscribe_url(entry_id)
    rendered = render(
        f"waitlist_{step}", name=name, app_url=links.app_url, unsubscribe_url=unsubscribe_url
    )
    headers = {"List-Unsubscribe": f"<{unsubscribe_url}>", "List-Unsubscribe-Post": ONE_CLICK}
    key = f"waitlist/{entry_id}/{step}"
    return Draft(key, email, rendered.subject, rendered.html, rendered.text, headers)


def trial_reminder(
    user_id: uuid.UUID,
    email: str,
    name: str | None,
    trial_ends_at: datetime,
    days_left: int,
    app_url: str | None = None,
) -> Draft:
    rendered = render(
        "trial_ending",
        name=name,
        app_url=app_url or PRODUCT_URL,
        trial_ends_at=trial_ends_at.strftime("%Y-%m-%d"),
        days_left=days_left,
    )
    key = f"trial-reminder/{user_id}"
    return Draft(key, email, rendered.subject, rendered.html, rendered.text)


def trial_expired(
    user_id: uuid.UUID, email: str, name: str | None, app_url: str | None = None
) -> Draft:
    rendered = render("trial_expired", name=name, app_url=app_url or PRODUCT_URL)
    key = f"trial-expired/{user_id}"
    return Draft(key, email, rendered.subject, rendered.html, rendered.text)

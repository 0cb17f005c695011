"""The emails the platform sends, as outbox drafts with their derived idempotency keys.

Keys name the logical email, not the attempt: `welcome/<user_id>`, `waitlist/<entry_id>/<step>`,
`trial-reminder/<user_id>`, `trial-expired/<user_id>` (callers' own keys live apart, under
`caller/`: jobs/email/keys.py). Whatever job or retry renders one of these again, the outbox
sends it once.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from jobs.email.keys import welcome_key
from jobs.email.outbox import Draft
from jobs.email.templates import render

# Settings has no APP_URL yet (CONTRACT §3 lists none); links point at the product's home.
APP_URL = "https://app.contact360.io"
LAST_WAITLIST_STEP = 3


def welcome(user_id: uuid.UUID, email: str, name: str | None) -> Draft:
    rendered = render("welcome", name=name, app_url=APP_URL)
    return Draft(welcome_key(user_id), email, rendered.subject, rendered.html, rendered.text)


def unsubscribe_url(entry_id: uuid.UUID) -> str:
    return f"{APP_URL}/waitlist/unsubscribe?entry={entry_id}"


def waitlist_step(entry_id: uuid.UUID, email: str, name: str | None, step: int) -> Draft:
    if not 1 <= step <= LAST_WAITLIST_STEP:
        raise ValueError(f"waitlist step must be 1-{LAST_WAITLIST_STEP}, got {step}")
    rendered = render(
        f"waitlist_{step}", name=name, app_url=APP_URL, unsubscribe_url=unsubscribe_url(entry_id)
    )
    key = f"waitlist/{entry_id}/{step}"
    return Draft(key, email, rendered.subject, rendered.html, rendered.text)


def trial_reminder(
    user_id: uuid.UUID, email: str, name: str | None, trial_ends_at: datetime, days_left: int
) -> Draft:
    rendered = render(
        "trial_ending",
        name=name,
        app_url=APP_URL,
        trial_ends_at=trial_ends_at.strftime("%Y-%m-%d"),
        days_left=days_left,
    )
    key = f"trial-reminder/{user_id}"
    return Draft(key, email, rendered.subject, rendered.html, rendered.text)


def trial_expired(user_id: uuid.UUID, email: str, name: str | None) -> Draft:
    rendered = render("trial_expired", name=name, app_url=APP_URL)
    key = f"trial-expired/{user_id}"
    return Draft(key, email, rendered.subject, rendered.html, rendered.text)

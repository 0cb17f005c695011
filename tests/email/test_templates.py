"""Every email renders in HTML and text; user values are escaped in HTML only."""

from __future__ import annotations

import re
from typing import Any

import jinja2
import pytest

from jobs.email.templates import REQUIRED_CONTEXT, TEMPLATE_NAMES, _environment, render

CONTEXT: dict[str, Any] = {
    "name": "Ada",
    "app_url": "https://app.contact360.test/",
    "unsubscribe_url": "https://app.contact360.test/unsubscribe?token=abc&list=waitlist",
    "trial_ends_at": "2026-12-01",
    "days_left": 3,
    "confirm_url": "https://app.contact360.test/waitlist/confirm/abc",
    "expires_days": 7,
}
SUBJECTS = {
    "welcome": "Welcome to Contact360, Ada",
    "waitlist_confirm": "Confirm your place on the Contact360 waitlist",
    "waitlist_1": "You're on the Contact360 waitlist",
    "waitlist_2": "How Contact360 keeps your contacts in one place",
    "waitlist_3": "Your Contact360 spot is almost ready",
    "trial_ending": "Your Contact360 trial ends in 3 days",
    "trial_expired": "Your Contact360 trial has ended",
}
HTML_TAG = re.compile(r"</?[a-zA-Z!][^>]*>")


def context_for(template: str, /, **overrides: Any) -> dict[str, Any]:
    return {key: CONTEXT[key] for key in REQUIRED_CONTEXT[template]} | overrides


def test_the_seven_emails_exist() -> None:
    assert TEMPLATE_NAMES == (
        "welcome",
        "waitlist_confirm",
        "waitlist_1",
        "waitlist_2",
        "waitlist_3",
        "trial_ending",
        "trial_expired",
    )


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_renders_html_and_text(template: str) -> None:
    email = render(template, **context_for(template))
    assert email.subject == SUBJECTS[template]
    assert email.html.startswith("<!doctype html>")
    assert "<p>Hi Ada,</p>" in email.html
    assert email.text.startswith("Hi Ada,\n\n")
    assert email.text.endswith("The Contact360 team\n") or "Unsubscribe: " in email.text
    assert HTML_TAG.search(email.text) is None
    # The confirmation's one link is the signed one: nothing else to click in it.
    link = CONTEXT["app_url" if "app_url" in REQUIRED_CONTEXT[template] else "confirm_url"]
    assert f'href="{link}"' in email.html
    assert link in email.text


@pytest.mark.parametrize("template", ["waitlist_1", "waitlist_2", "waitlist_3"])
def test_waitlist_emails_carry_the_unsubscribe_link(template: str) -> None:
    email = render(template, **context_for(template))
    assert (
        '<a href="https://app.contact360.test/unsubscribe?token=abc&amp;list=waitlist">'
        in email.html
    )
    assert email.text.endswith(
        "Unsubscribe: https://app.contact360.test/unsubscribe?token=abc&list=waitlist\n"
    )


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_html_escapes_a_users_name(template: str) -> None:
    evil = '<script>alert("x")</script>'
    email = render(template, **context_for(template, name=evil))
    assert "<script>" not in email.html
    assert "<p>Hi &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;,</p>" in email.html
    # Plain text is never interpreted as markup: the name stays as the user typed it.
    assert email.text.startswith(f"Hi {evil},\n")


def test_without_a_name_greets_generically() -> None:
    email = render("welcome", **context_for("welcome", name=None))
    assert email.subject == "Welcome to Contact360"
    assert "<p>Hi there,</p>" in email.html
    assert email.text.startswith("Hi there,\n")


def test_subject_stays_one_line() -> None:
    email = render("welcome", **context_for("welcome", name="Ada\r\nBcc: evil@x.test"))
    assert email.subject == "Welcome to Contact360, Ada Bcc: evil@x.test"


def test_trial_ending_singular_day() -> None:
    email = render("trial_ending", **context_for("trial_ending", days_left=1))
    assert email.subject == "Your Contact360 trial ends in 1 day"
    assert "ends on 2026-12-01 (1 day from now)" in email.text


def test_missing_variable_raises() -> None:
    with pytest.raises(jinja2.UndefinedError, match="needs trial_ends_at"):
        render("trial_ending", name="Ada", app_url="https://x", days_left=3)


def test_unknown_template_raises() -> None:
    with pytest.raises(KeyError, match="no email template 'goodbye'"):
        render("goodbye", name="Ada")


def test_environment_is_built_once() -> None:
    assert _environment(True) is _environment(True)
    assert _environment(True) is not _environment(False)
    assert _environment(True).undefined is jinja2.StrictUndefined

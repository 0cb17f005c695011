"""What a caller may pass to `send_email` and `join_waitlist`, checked before anything is written.

`JobsClient` calls these first, so bad input raises `ValueError` with a message saying what to
fix, and no outbox row, waitlist entry or Redis job exists for it. Addresses are checked by the
importer's own rule (`jobs.imports.validate.email_problem`): one definition of a valid email.
"""

from __future__ import annotations

import re
import unicodedata

from jobs.email.keys import CALLER_PREFIX
from jobs.imports.validate import email_problem
from worker.email_providers.resend import MAX_IDEMPOTENCY_KEY_CHARS

# RFC 5322 2.1.1: a header line is at most 998 characters; providers fold, but a subject
# longer than one line is a bug, not an email.
MAX_SUBJECT_CHARS = 998
# Gmail clips a message body past ~102 KB ("[Message clipped]"), so a transactional email
# near this cap is already broken for its reader; 256 KiB per part leaves room for inline CSS
# and keeps a job far below the serializer's 16 MiB payload cap and the providers' own limits
# (Resend 40 MB, SendGrid 30 MB per message). Counted in UTF-8 bytes, as they travel.
MAX_HTML_BYTES = 256 * 1024
MAX_TEXT_BYTES = 256 * 1024
# The key travels as Resend's `Idempotency-Key` (1-256 characters) behind `caller/`, and as an
# HTTP header value: printable ASCII without spaces.
MAX_IDEMPOTENCY_KEY_CHARS_CALLER = MAX_IDEMPOTENCY_KEY_CHARS - len(CALLER_PREFIX)
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")

# A waitlist name is rendered into three emails sent from our domain (AUDIT M4): it may be a
# person's name, never a message. 100 characters fit any real name (the importer allows 255
# for first and last name together with company data; a greeting needs far less).
MAX_NAME_CHARS = 100
# Characters that separate domain labels (IDNA: full stop, ideographic and full-width ones).
_LABEL_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# Text a mail client turns into a link, or a reader reads as one: `evil.example`, `bit.ly`,
# `x@evil.example`. Labels may be any letters (homoglyph domains); the last one is two or more
# letters, so initials (`J.R.R. Tolkien`) and abbreviations (`St. John`) are not matched.
_DOMAIN_LIKE = re.compile(r"\w[\w-]*\.[^\W\d_]{2,}")
_IPV4_LIKE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# Control and format characters (line breaks, tabs, bidi overrides, zero-width joiners that
# hide a dot), and line/paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _has_control(value: str) -> bool:
    return any(unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in value)


def check_send_email(
    to: str, subject: str, html: str, text: str | None, idempotency_key: str | None
) -> None:
    """Raise `ValueError` unless `send_email`'s arguments fit the caps above."""
    problem = email_problem(to) if isinstance(to, str) else "email: not a string"
    if problem is not None:
        raise ValueError(f"send_email: `to` is {problem.removeprefix('email: ')}")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("send_email: `subject` must be a non-empty string")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise ValueError(
            f"send_email: `subject` is {len(subject)} characters; at most {MAX_SUBJECT_CHARS} "
            "(one RFC 5322 header line)"
        )
    if _has_control(subject):
        raise ValueError(
            "send_email: `subject` must be one line, without line breaks or control characters"
        )
    _check_body("html", html, MAX_HTML_BYTES)
    if text is not None:
        _check_body("text", text, MAX_TEXT_BYTES)
    if idempotency_key is not None and not (
        isinstance(idempotency_key, str)
        and len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS_CALLER
        and _HEADER_SAFE.fullmatch(idempotency_key)
    ):
        raise ValueError(
            "send_email: `idempotency_key` must be 1-"
            f"{MAX_IDEMPOTENCY_KEY_CHARS_CALLER} printable ASCII characters without spaces"
        )


def _check_body(name: str, value: str, max_bytes: int) -> None:
    if not isinstance(value, str):
        raise ValueError(f"send_email: `{name}` must be a string")
    # len() first: a str of n characters is at least n bytes, so a huge body is refused
    # without encoding it.
    if len(value) > max_bytes or len(value.encode()) > max_bytes:
        raise ValueError(
            f"send_email: `{name}` is over {max_bytes // 1024} KiB (UTF-8); "
            "link to large content instead of sending it in the email"
        )


def check_waitlist_signup(email: str, name: str | None) -> tuple[str, str | None]:
    """The address as stored (trimmed, lower-cased) and the name (trimmed, or None); or raise."""
    normalized = email.strip().lower() if isinstance(email, str) else ""
    problem = email_problem(normalized or None)
    if problem is not None:
        raise ValueError(f"join_waitlist: {problem}")
    if name is None:
        return normalized, None
    if not isinstance(name, str):
        raise ValueError("join_waitlist: name must be a string")
    cleaned = name.strip()
    if len(cleaned) > MAX_NAME_CHARS:
        raise ValueError(f"join_waitlist: name is longer than {MAX_NAME_CHARS} characters")
    if _has_control(cleaned):
        raise ValueError("join_waitlist: name must be one line, without control characters")
    # NFKC folds full-width and other compatibility forms of letters and dots first.
    folded = unicodedata.normalize("NFKC", cleaned).translate(_LABEL_DOTS).lower()
    if (
        "://" in folded
        or "www." in folded
        or _DOMAIN_LIKE.search(folded)
        or _IPV4_LIKE.search(folded)
    ):
        raise ValueError(
            "join_waitlist: name must not contain a web address, domain or email address"
        )
    return normalized, cleaned or None

"""Signed, URL-safe tokens that name a waitlist entry, for the links in our email.

    token = make_token(UNSUBSCRIBE, entry_id, settings.secret_key)
    entry_id = read_token(UNSUBSCRIBE, token, settings.secret_key)   # None: refuse it

A token is base64url (no padding) of `version || entry id (16 bytes) || HMAC-SHA256`, 66
characters. The MAC key is derived from SECRET_KEY per purpose (HMAC(SECRET_KEY, purpose)), so
an unsubscribe token is never a confirm token, and a leaked token of one purpose says nothing
about the other. Reading refuses anything but the exact canonical encoding of a valid MAC
(compared in constant time): a forged, truncated, altered, re-signed or other-purpose token
reads as None, with no hint of why.

Tokens do not expire by themselves. An unsubscribe link must keep working for as long as the
email sits in an inbox (RFC 8058 one-click links, and CAN-SPAM's 30 days after sending at the
least), so it has no end date; it only names an entry and can only unsubscribe it. A confirm
token ends with its entry: unconfirmed entries are deleted after `CONFIRM_TTL`
(jobs/email/campaign.py), and a fresh sign-up gets a new entry id. Changing SECRET_KEY
invalidates every link already sent.

Made by the campaign jobs (worker: SECRET_KEY and APP_URL needed to send campaign email) and
read by `JobsClient.unsubscribe` / `confirm_waitlist` and the public app (SECRET_KEY needed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

from pydantic import SecretStr


@dataclass(frozen=True, slots=True)
class Purpose:
    """What a token may do, and the public app's path that does it (`{APP_URL}{path}{token}`)."""

    name: str
    path: str


UNSUBSCRIBE = Purpose("unsubscribe", "/email/unsubscribe/")
CONFIRM_WAITLIST = Purpose("confirm-waitlist", "/waitlist/confirm/")

_VERSION = b"\x01"
_MAC_BYTES = hashlib.sha256().digest_size
_TOKEN_BYTES = len(_VERSION) + 16 + _MAC_BYTES
_TOKEN_CHARS = (_TOKEN_BYTES * 8 + 5) // 6
_TOKEN = re.compile(rf"[A-Za-z0-9_-]{{{_TOKEN_CHARS}}}", re.ASCII)


class MissingSecretKey(ValueError):
    """SECRET_KEY is not set: no token can be made or checked."""


def _require(secret_key: SecretStr | None) -> bytes:
    if secret_key is None or not secret_key.get_secret_value():
        raise MissingSecretKey(
            "SECRET_KEY is not set: it signs the unsubscribe and confirmation links "
            "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return secret_key.get_secret_value().encode()


def _mac(purpose: Purpose, secret_key: SecretStr | None, message: bytes) -> bytes:
    derived = hmac.new(_require(secret_key), b"contact360 token " + purpose.name.encode(), "sha256")
    return hmac.new(derived.digest(), message, "sha256").digest()


def make_token(purpose: Purpose, entry_id: uuid.UUID, secret_key: SecretStr | None) -> str:
    """The token for `entry_id`; raises `MissingSecretKey` without SECRET_KEY."""
    message = _VERSION + entry_id.bytes
    raw = message + _mac(purpose, secret_key, message)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def read_token(purpose: Purpose, token: str, secret_key: SecretStr | None) -> uuid.UUID | None:
    """The entry a valid `purpose` token names, else None; raises `MissingSecretKey`."""
    _require(secret_key)  # a missing key is a deploy fault, not a bad token: say so first
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    # The last character carries 2 spare bits: only the canonical spelling is the token.
    if len(raw) != _TOKEN_BYTES or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != token:
        return None
    message, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(purpose, secret_key, message)):
        return None
    if message[:1] != _VERSION:
        return None
    return uuid.UUID(bytes=message[1:])


def link(app_url: str, purpose: Purpose, token: str) -> str:
    """`{APP_URL}{purpose.path}{token}`: the one place the public app's URLs are spelled."""
    return f"{app_url.rstrip('/')}{purpose.path}{token}"

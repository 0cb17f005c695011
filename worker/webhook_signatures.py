"""Checking the signatures of the email providers' webhooks (Resend via Svix, SendGrid).

- Resend signs with Svix (https://docs.svix.com/receiving/verifying-payloads/how-manual):
  HMAC-SHA256 over `{svix-id}.{svix-timestamp}.{raw body}`, keyed with the base64 part of the
  `whsec_...` secret; `svix-signature` lists `v1,<base64>` entries separated by spaces (more
  than one while a secret is rotated), and any one of them matching is enough.
- SendGrid's Signed Event Webhook
  (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features):
  ECDSA P-256 with SHA-256 over `timestamp + raw body`, the timestamp from
  `X-Twilio-Email-Event-Webhook-Timestamp`, the base64 DER signature in
  `X-Twilio-Email-Event-Webhook-Signature`, and the public key SendGrid shows as base64 DER
  (SubjectPublicKeyInfo), as sendgrid-python's `EventWebhook.verify_signature` checks it.

Either way a timestamp more than 5 minutes old or ahead is refused, as Svix's own libraries
do (`WEBHOOK_TOLERANCE_IN_SECONDS = 5 * 60`): a captured request cannot be replayed later.
Every failure is one `BadSignature`, whose message never carries the secret or a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

TOLERANCE_S = 5 * 60
SVIX_SECRET_PREFIX = "whsec_"


class BadSignature(Exception):
    """The request is not provably the provider's, or is too old: answer 401, store nothing."""


def svix_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; `ValueError` naming what is wrong."""
    if not secret.startswith(SVIX_SECRET_PREFIX):
        raise ValueError(f"must start with {SVIX_SECRET_PREFIX} (Resend's webhook signing secret)")
    try:
        key = base64.b64decode(secret.removeprefix(SVIX_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SVIX_SECRET_PREFIX} is not base64") from None
    if not key:
        raise ValueError(f"the part after {SVIX_SECRET_PREFIX} is empty")
    return key


def sendgrid_key(public_key: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key (base64 DER); `ValueError` unless it is a P-256 public key."""
    try:
        der = base64.b64decode("".join(public_key.split()), validate=True)
        key = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError):
        raise ValueError(
            "is not a base64 public key (copy the verification key SendGrid shows under "
            "Mail Settings > Signed Event Webhook)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("is not an ECDSA P-256 public key")
    return key


def _check_timestamp(timestamp: str | None, now_s: float | None) -> None:
    # Unix seconds: 10 digits until the year 2286; a longer "number" is not a timestamp.
    if not timestamp or len(timestamp) > 12 or not timestamp.isascii() or not timestamp.isdigit():
        raise BadSignature("missing or malformed timestamp")
    age_s = (time.time() if now_s is None else now_s) - int(timestamp)
    if abs(age_s) > TOLERANCE_S:
        raise BadSignature(f"timestamp is {age_s:.0f} s off (more than {TOLERANCE_S} s)")


def verify_svix(
    key: bytes,
    body: bytes,
    msg_id: str | None,
    timestamp: str | None,
    signatures: str | None,
    *,
    now_s: float | None = None,
) -> None:
    """Raise `BadSignature` unless one `v1` signature in `signatures` signs this request."""
    if not msg_id or not signatures:
        raise BadSignature("missing svix-id or svix-signature")
    _check_timestamp(timestamp, now_s)
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for entry in signatures.split():
        version, _, signature = entry.partition(",")
        # compare_digest: no timing difference tells an attacker how much of a guess matched.
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return
    raise BadSignature("no matching v1 signature")


def verify_sendgrid(
    key: ec.EllipticCurvePublicKey,
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    *,
    now_s: float | None = None,
) -> None:
    """Raise `BadSignature` unless `signature` is SendGrid's ECDSA signature of this request."""
    if not signature:
        raise BadSignature("missing signature header")
    _check_timestamp(timestamp, now_s)
    assert timestamp is not None  # checked above
    try:
        der = base64.b64decode(signature, validate=True)
        key.verify(der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, InvalidSignature):
        raise BadSignature("signature does not verify") from None

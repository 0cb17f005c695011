"""Webhook requests signed the way the providers sign them, built here from their documents.

Svix (Resend): https://docs.svix.com/receiving/verifying-payloads/how-manual. SendGrid:
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features
(ECDSA P-256, SHA-256, over timestamp + body; base64 DER signature and public key). Written
from those texts, not from worker/webhook_signatures.py, so a shared mistake cannot pass.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SVIX_KEY = b"contact360-test-svix-key-32bytes"
RESEND_SECRET = "whsec_" + base64.b64encode(SVIX_KEY).decode()


def svix_headers(
    body: bytes, *, key: bytes = SVIX_KEY, msg_id: str | None = None, at_s: float | None = None
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = str(int(time.time() if at_s is None else at_s))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "svix-id": msg_id,
        "svix-timestamp": timestamp,
        # A rotated-out signature first, as Svix sends during a secret rotation.
        "svix-signature": f"v1,{base64.b64encode(b'old' * 11).decode()} v1,{signature}",
        "content-type": "application/json",
    }


@dataclass(frozen=True)
class SendGridKeys:
    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> SendGridKeys:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_b64(self) -> str:
        """The key as SendGrid's settings page shows it: base64 DER SubjectPublicKeyInfo."""
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def headers(self, body: bytes, *, at_s: float | None = None) -> dict[str, str]:
        timestamp = str(int(time.time() if at_s is None else at_s))
        signature = self.private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
            "content-type": "application/json",
        }


def resend_bounce(to: str) -> bytes:
    return json.dumps(
        {
            "type": "email.bounced",
            "created_at": "2026-12-20T10:00:00.000Z",
            "data": {
                "email_id": str(uuid.uuid4()),
                "to": [to],
                "subject": "Welcome",
                "bounce": {"message": "mailbox does not exist", "type": "Permanent"},
            },
        }
    ).encode()


def sendgrid_event(event: str, email: str, **extra: Any) -> dict[str, Any]:
    return {
        "email": email,
        "timestamp": int(time.time()),
        "event": event,
        "sg_event_id": base64.b64encode(uuid.uuid4().bytes).decode(),
        "sg_message_id": f"{uuid.uuid4().hex[:22]}.filter0001.16648.5515E0B88.0",
        **extra,
    }

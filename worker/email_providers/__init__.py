"""Email providers behind one small interface (`EmailProvider.send`).

    provider = make_email_provider(settings, http)      # console | resend | sendgrid
    message_id = await provider.send(OutgoingEmail(...), idempotency_key="welcome/<user_id>")

Errors: see `base` (DeliveryUnknown, RateLimited, TransientError, PermanentError). Delivery
guarantee per provider: Resend deduplicates by `Idempotency-Key`, so every transient failure may
be resent; SendGrid does not, so a `DeliveryUnknown` must be held for review.
"""

from __future__ import annotations

import httpx
from pydantic import SecretStr

from worker.email_providers.base import (
    DeliveryUnknown,
    EmailProvider,
    OutgoingEmail,
)
from worker.email_providers.console import ConsoleProvider
from worker.email_providers.resend import ResendProvider
from worker.email_providers.sendgrid import SendGridProvider
from worker.settings import Settings

__all__ = [
    "ConsoleProvider",
    "DeliveryUnknown",
    "EmailProvider",
    "OutgoingEmail",
    "ResendProvider",
    "SendGridProvider",
    "make_email_provider",
    "safe_to_resend",
]


def make_email_provider(settings: Settings, http: httpx.AsyncClient) -> EmailProvider:
    """The provider `EMAIL_PROVIDER` names, on the process's shared client."""
    if settings.email_provider is None:
        raise ValueError("EMAIL_PROVIDER is not set (resend, sendgrid, or console to send nothing)")
    if settings.email_provider == "console":
        return ConsoleProvider()
    key = _require_key(settings.email_api_key, "EMAIL_API_KEY")
    if settings.email_provider == "resend":
        return ResendProvider(http=http, api_key=key, base_url=settings.email_base_url)
    return SendGridProvider(http=http, api_key=key, base_url=settings.email_base_url)


def safe_to_resend(provider: EmailProvider) -> bool:
    """Whether a `DeliveryUnknown` from `provider` may be resent (it deduplicates by key)."""
    return provider.name in ("resend", "console")


def _require_key(key: SecretStr | None, variable: str) -> SecretStr:
    if key is None:  # Settings validates this; kept for providers built from partial settings
        raise ValueError(f"{variable} is required for this provider")
    return key

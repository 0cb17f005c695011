"""RESEND_WEBHOOK_SECRET and SENDGRID_WEBHOOK_PUBLIC_KEY: refused at start-up, clearly, if wrong."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.webhooks.signing import RESEND_SECRET, SendGridKeys
from worker.settings import Settings


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "RESEND_WEBHOOK_SECRET must start with whsec_"),
        ("whsec_not base64!", "RESEND_WEBHOOK_SECRET the part after whsec_ is not base64"),
    ],
)
def test_a_malformed_resend_secret_is_refused_without_echoing_it(value: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(resend_webhook_secret=value)
    assert message in str(caught.value)
    assert value not in str(caught.value) and value not in repr(caught.value.errors())


def test_a_sendgrid_key_must_be_a_p256_public_key() -> None:
    with pytest.raises(ValidationError, match="SENDGRID_WEBHOOK_PUBLIC_KEY is not a base64"):
        Settings(sendgrid_webhook_public_key="not a key")
    # An RSA-sized blob of valid base64 that is not a key at all.
    with pytest.raises(ValidationError, match="SENDGRID_WEBHOOK_PUBLIC_KEY"):
        Settings(sendgrid_webhook_public_key="QUJD" * 20)


def test_good_values_load_and_the_secret_stays_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    key = SendGridKeys.generate().public_b64
    monkeypatch.setenv("RESEND_WEBHOOK_SECRET", f" {RESEND_SECRET} ")
    monkeypatch.setenv("SENDGRID_WEBHOOK_PUBLIC_KEY", key)
    settings = Settings()
    assert settings.resend_webhook_secret is not None
    assert settings.resend_webhook_secret.get_secret_value() == RESEND_SECRET
    assert settings.sendgrid_webhook_public_key == key
    assert RESEND_SECRET not in repr(settings)
    # Empty means unset (an .env line left blank), as for the other secrets.
    monkeypatch.setenv("RESEND_WEBHOOK_SECRET", "")
    monkeypatch.setenv("SENDGRID_WEBHOOK_PUBLIC_KEY", "")
    unset = Settings()
    assert (unset.resend_webhook_secret, unset.sendgrid_webhook_public_key) == (None, None)

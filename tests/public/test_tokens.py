"""Signed link tokens from the attacker's side: only the exact token we made reads back."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

import pytest
from pydantic import SecretStr

from worker.tokens import (
    CONFIRM_WAITLIST,
    UNSUBSCRIBE,
    MissingSecretKey,
    make_token,
    read_token,
)

KEY = SecretStr("k" * 40)
OTHER_KEY = SecretStr("o" * 40)
ENTRY = uuid.UUID("5b0c2b64-6a0b-4cb8-9f57-2a3f1f6a3c01")


def test_a_token_names_its_entry_and_is_url_safe() -> None:
    token = make_token(UNSUBSCRIBE, ENTRY, KEY)
    assert read_token(UNSUBSCRIBE, token, KEY) == ENTRY
    assert token.isascii() and all(c.isalnum() or c in "-_" for c in token)
    assert str(ENTRY) not in token and ENTRY.hex not in token
    assert make_token(UNSUBSCRIBE, ENTRY, KEY) == token  # stable: one link per entry


def test_another_purpose_or_key_refuses_it() -> None:
    token = make_token(UNSUBSCRIBE, ENTRY, KEY)
    assert read_token(CONFIRM_WAITLIST, token, KEY) is None
    assert read_token(UNSUBSCRIBE, make_token(CONFIRM_WAITLIST, ENTRY, KEY), KEY) is None
    assert read_token(UNSUBSCRIBE, token, OTHER_KEY) is None
    assert make_token(CONFIRM_WAITLIST, ENTRY, KEY) != token


def test_truncated_extended_and_altered_tokens_are_refused() -> None:
    token = make_token(UNSUBSCRIBE, ENTRY, KEY)
    assert read_token(UNSUBSCRIBE, token[:-1], KEY) is None
    assert read_token(UNSUBSCRIBE, token[:22], KEY) is None
    assert read_token(UNSUBSCRIBE, token + "A", KEY) is None
    assert read_token(UNSUBSCRIBE, "", KEY) is None
    for position in range(len(token)):
        flipped = "B" if token[position] == "A" else "A"
        altered = token[:position] + flipped + token[position + 1 :]
        assert read_token(UNSUBSCRIBE, altered, KEY) is None, position
    # The same bytes spelled with padding, or in standard base64: not our token.
    assert read_token(UNSUBSCRIBE, token + "==", KEY) is None
    standard = base64.b64encode(base64.urlsafe_b64decode(token + "==")).rstrip(b"=").decode()
    assert standard != token  # this key and entry give a token with '-' or '_' in it
    assert read_token(UNSUBSCRIBE, standard, KEY) is None


def test_another_recipient_cannot_be_forged_from_a_valid_token() -> None:
    raw = bytearray(base64.urlsafe_b64decode(make_token(UNSUBSCRIBE, ENTRY, KEY) + "=="))
    victim = uuid.uuid4()
    raw[1:17] = victim.bytes  # keep our MAC, name someone else
    forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert read_token(UNSUBSCRIBE, forged, KEY) is None


def test_a_token_re_signed_with_a_guessed_key_is_refused() -> None:
    # The attacker knows the format and signs the victim's id with a key of their own,
    # directly and with our derivation.
    victim = uuid.uuid4()
    message = b"\x01" + victim.bytes
    for key in (b"", b"secret", OTHER_KEY.get_secret_value().encode()):
        mac = hmac.new(key, message, hashlib.sha256).digest()
        forged = base64.urlsafe_b64encode(message + mac).rstrip(b"=").decode()
        assert read_token(UNSUBSCRIBE, forged, KEY) is None
    assert read_token(UNSUBSCRIBE, make_token(UNSUBSCRIBE, victim, OTHER_KEY), KEY) is None


def test_a_non_canonical_spelling_of_a_valid_token_is_refused() -> None:
    token = make_token(UNSUBSCRIBE, ENTRY, KEY)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 49 bytes in 66 characters leave the last character's low 4 bits unused.
    index = alphabet.index(token[-1])
    twin = token[:-1] + alphabet[index ^ 1]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(token + "==")
    assert read_token(UNSUBSCRIBE, twin, KEY) is None


def test_without_secret_key_nothing_is_made_or_read() -> None:
    with pytest.raises(MissingSecretKey, match="SECRET_KEY is not set"):
        make_token(UNSUBSCRIBE, ENTRY, None)
    with pytest.raises(MissingSecretKey, match="SECRET_KEY is not set"):
        read_token(UNSUBSCRIBE, "not-a-token", None)

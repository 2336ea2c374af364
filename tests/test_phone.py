"""Phone normalisation: the PH forms GHL users type become E.164; the rest say why not."""

from __future__ import annotations

import pytest

from castghld.log import redact_numbers
from castghld.phone import InvalidNumber, normalize_any, normalize_mobile


@pytest.mark.parametrize(
    "raw", ["09171234567", "639171234567", "+639171234567", "+63 917 123 4567", "0917-123-4567"]
)
def test_ph_mobile_forms_become_e164(raw):
    assert normalize_mobile(raw) == "+639171234567"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "INVALID_NUMBER"),
        ("12345", "INVALID_NUMBER"),
        ("hello", "INVALID_NUMBER"),
        ("9" * 100, "INVALID_NUMBER"),
        ("+63 2 8527 8121", "NOT_MOBILE"),
        ("+447400123456", "REGION_NOT_ALLOWED"),
    ],
)
def test_numbers_we_cannot_text_say_why(raw, code):
    with pytest.raises(InvalidNumber) as info:
        normalize_mobile(raw)
    assert info.value.code == code
    assert info.value.message


def test_other_regions_pass_when_allowed():
    assert normalize_mobile("+447400123456", allowed_regions=None) == "+447400123456"
    assert normalize_mobile("+447400123456", allowed_regions=frozenset({"PH", "GB"}))


def test_normalize_any_keeps_sender_ids_apart():
    assert normalize_any("09181234567") == "+639181234567"
    assert normalize_any("CASTDEMO") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Invalid number +639171234567", "Invalid number [number]"),
        ("to 0917-123-4567 refused", "to [number] refused"),
        ("Message to 09171234567.", "Message to [number]."),
        ("refused +639171234567: not a mobile", "refused [number]: not a mobile"),
        ("at epoch 1764200000.5", "at epoch 1764200000.5"),
        ("at 2026-11-26 13:05:51", "at 2026-11-26 13:05:51"),
        ("location ve9EPM428h8vShlRW1KT", "location ve9EPM428h8vShlRW1KT"),
    ],
)
def test_upstream_messages_lose_phone_numbers(text, expected):
    assert redact_numbers(text) == expected

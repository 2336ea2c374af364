"""Phone number normalisation with ``phonenumbers``.

Guarantees: ``normalize_mobile`` returns an E.164 string (``+639171234567``) for a valid mobile
number in an allowed region, and otherwise raises ``InvalidNumber`` whose ``code`` says why
(``INVALID_NUMBER``, ``NOT_MOBILE``, ``REGION_NOT_ALLOWED``) and whose message is fit to show a
GHL user. Local PH forms (``0917...``, ``63917...``, ``+63 917 ...``) are accepted.
"""

from __future__ import annotations

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

MOBILE_TYPES = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)
# Longer input is not a phone number; phonenumbers refuses it too, but cheaply here.
MAX_INPUT_CHARS = 64


class InvalidNumber(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _parse(raw: str, default_region: str) -> phonenumbers.PhoneNumber:
    text = raw.strip()
    if not text or len(text) > MAX_INPUT_CHARS:
        raise InvalidNumber("INVALID_NUMBER", "empty or overlong phone number")
    digits = text.lstrip("+")
    # "63917..." without the plus is the PH country code written the local way.
    if not text.startswith("+") and digits.startswith("63") and len(digits) == 12:
        text = "+" + digits
    try:
        return phonenumbers.parse(text, default_region)
    except NumberParseException as e:
        raise InvalidNumber("INVALID_NUMBER", f"cannot parse phone number: {e._msg}") from None


def normalize_mobile(
    raw: str,
    default_region: str = "PH",
    allowed_regions: frozenset[str] | None = frozenset({"PH"}),
) -> str:
    """E.164 form of a mobile number we may text; ``allowed_regions=None`` allows any region."""
    number = _parse(raw, default_region)
    if not phonenumbers.is_valid_number(number):
        raise InvalidNumber("INVALID_NUMBER", "not a valid phone number")
    region = phonenumbers.region_code_for_number(number)
    if allowed_regions is not None and region not in allowed_regions:
        allowed = ", ".join(sorted(allowed_regions))
        raise InvalidNumber(
            "REGION_NOT_ALLOWED",
            f"numbers in {region or 'that region'} are not allowed ({allowed})",
        )
    if phonenumbers.number_type(number) not in MOBILE_TYPES:
        raise InvalidNumber("NOT_MOBILE", "not a mobile number: SMS cannot reach it")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def route_key(value: str) -> str:
    """How an inbound `to` is matched to a location: E.164 for a number in any PH form,
    case-folded text for a sender ID."""
    return normalize_any(value) or value.strip().casefold()


def normalize_any(raw: str, default_region: str = "PH") -> str | None:
    """E.164 form of any valid number, or None (sender IDs and short codes stay as they are)."""
    try:
        number = _parse(raw, default_region)
    except InvalidNumber:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

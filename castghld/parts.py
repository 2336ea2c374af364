"""SMS parts, counted as Cast counts them (SPEC §5: 1 credit = 1 part).

A text that fits the GSM 03.38 alphabet (the basic set, plus the extension set whose characters
take two septets each) is GSM-7: 160 septets in one part, 153 per part when split (the other 7
carry the concatenation header). Any other character makes the whole text UCS-2: 70 UTF-16 code
units in one part, 67 per part when split; a character outside the Basic Multilingual Plane
(most emoji) takes two code units.
"""

from __future__ import annotations

import math

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

GSM7_SINGLE, GSM7_SPLIT = 160, 153
UCS2_SINGLE, UCS2_SPLIT = 70, 67


def is_gsm7(text: str) -> bool:
    """True when every character of `text` is in the GSM-7 basic or extension set."""
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def message_parts(text: str) -> int:
    """How many parts (credits) Cast charges for `text`; an empty text is one part."""
    if is_gsm7(text):
        units = sum(2 if c in GSM7_EXTENSION else 1 for c in text)
        single, split = GSM7_SINGLE, GSM7_SPLIT
    else:
        # A lone surrogate (JSON allows "\ud800") is one code unit: counted, never raised on.
        units = len(text.encode("utf-16-le", "surrogatepass")) // 2
        single, split = UCS2_SINGLE, UCS2_SPLIT
    if units <= single:
        return 1
    return math.ceil(units / split)

"""Issue 11 §3: properties of everything that reads outside input, for any input (hypothesis).

Each reader either returns a value of its documented shape or refuses in its documented way
(None, APIError, InvalidNumber); none raises anything else, whatever the input. Examples are
derandomized (the same in every run, CI included) and no example database is written.
"""

from __future__ import annotations

import datetime
import re
import sys
from urllib.parse import quote, unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castghld import log
from castghld.handlers.app_webhook import webhook_time
from castghld.handlers.base import MAX_ID_CHARS, APIError, usable_id
from castghld.handlers.inbound import validate_inbound
from castghld.handlers.messages import outbound_payload
from castghld.inbound import received_at
from castghld.log import redact_numbers, scrub
from castghld.outbound import sms_text
from castghld.pacing import MAX_RETRY_AFTER, parse_interval_ms, parse_retry_after
from castghld.phone import InvalidNumber, normalize_any, normalize_mobile
from castghld.signatures import SignatureVerifier

PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TEXT = st.text(st.characters(codec=None), max_size=300) | st.sampled_from(
    ["", ".", "..", "x/../../../probe", "nul\x00", "\ud800", "inf", "-inf", "nan", "1e999"]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=25,
)
IDS = st.one_of(TEXT, st.integers(), st.just("ve9EPM428h8vShlRW1KT"))
GOOD_IDS = st.from_regex(r"[A-Za-z0-9]{1,24}", fullmatch=True) | st.integers(0, 10**12)
FIELDS = st.sampled_from(["type", "phone", "message", "attachments", "contactId", "userId"])


@PROPERTIES
@given(IDS | JSON)
def test_a_usable_id_is_short_ascii_that_stands_alone_in_a_url_segment(value):
    result = usable_id(value)
    if result is None:
        return
    assert isinstance(result, str)
    assert 1 <= len(result) <= MAX_ID_CHARS
    assert result.isascii() and result.isprintable()
    assert not set(result) & set("/?#% \\")
    assert result not in (".", "..")
    assert unquote(quote(result, safe="")) == result


@PROPERTIES
@given(st.dictionaries(FIELDS | TEXT, JSON, max_size=8), GOOD_IDS, GOOD_IDS)
def test_any_outbound_body_with_usable_ids_gives_a_record_or_a_reason(body, message_id, loc):
    message_id, location_id = usable_id(message_id), usable_id(loc)
    assert message_id is not None and location_id is not None
    payload, refused = outbound_payload(
        {**body, "messageId": message_id, "locationId": location_id}
    )
    for name in ("type", "phone", "message"):
        assert isinstance(payload[name], str)
    assert all(isinstance(url, str) and url for url in payload["attachments"])
    assert refused is None or (refused[0] == "INVALID_FIELD" and isinstance(refused[1], str))
    sms_text({**payload, "attachments": tuple(payload["attachments"])})


@PROPERTIES
@given(JSON)
def test_any_inbound_body_is_valid_or_a_400_naming_the_problem(body):
    try:
        result = validate_inbound(body)
    except APIError as e:
        assert e.status_code == 400 and e.message
        return
    assert isinstance(result, dict)


@PROPERTIES
@given(TEXT | st.datetimes().map(lambda d: d.isoformat()))
def test_any_received_at_becomes_a_utc_timestamp(value):
    stamp = received_at(value)
    assert stamp.endswith("Z")
    datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")


@PROPERTIES
@given(JSON)
def test_any_app_webhook_timestamp_is_epoch_seconds_or_none(value):
    when = webhook_time(value)
    assert when is None or isinstance(when, float)


@PROPERTIES
@given(TEXT | st.floats(allow_nan=True).map(str) | st.integers().map(str))
def test_any_retry_after_is_bounded(value):
    wait = parse_retry_after(value)
    assert wait is None or 0.0 <= wait <= MAX_RETRY_AFTER
    interval = parse_interval_ms(value)
    assert interval is None or 0.0 <= interval <= MAX_RETRY_AFTER


@PROPERTIES
@given(TEXT)
def test_any_phone_text_is_a_number_or_a_refusal(value):
    try:
        number = normalize_mobile(value)
    except InvalidNumber as e:
        assert e.code in ("INVALID_NUMBER", "NOT_MOBILE", "REGION_NOT_ALLOWED")
    else:
        assert number.startswith("+63")
    assert normalize_any(value) is None or normalize_any(value).startswith("+")


@PROPERTIES
@given(st.from_regex(r"(\+63|63|0)9[0-9]{9}", fullmatch=True), TEXT, TEXT)
def test_a_phone_number_never_survives_redaction(number, before, after):
    redacted = redact_numbers(f"{before} {number} {after}")
    assert number not in redacted


def _scrub_by_patterns(text):
    return log._scrub_by_patterns(text)


SECRETISH = st.lists(
    st.sampled_from(
        [
            *log.SCRUB_KEYS,
            *("Bearer ", "X-Api-Key: ", "AUTHORIZATION=", "=", ":", " ", '"', "&", "s3cr3t"),
            *("\u0130", "\u0131", "\u017f", "\u212a", "toKen", "\u017ftate", "\u212aey"),
        ]
    )
    | TEXT,
    max_size=8,
).map("".join)


@PROPERTIES
@given(SECRETISH)
def test_scrub_fast_path_changes_nothing(text):
    """`scrub` skips its patterns when no trigger word is in the line: that must never change
    what it returns, whatever the case or Unicode folding of the words."""
    assert scrub(text) == _scrub_by_patterns(text)


def test_scrub_folds_like_the_patterns():
    for text in (
        "\u212aEY token=abc",
        "\u017ftate=abc",
        "acce\u017fs_token=abc",
        "\u0130gnored code=1",
    ):
        assert scrub(text) == _scrub_by_patterns(text)
    assert "abc" not in scrub("\u017ftate=abc")


def test_scrub_fast_path_folds_every_character_the_patterns_fold():
    """Exhaustive over this Python's Unicode database, where the property test samples: every
    character that the patterns' re.IGNORECASE matches to a letter of a trigger word is that
    letter in the fast path's lowered line. `str.lower` is per character but for the final
    sigma (not ASCII), so no line the patterns would change is skipped, whatever a Python
    upgrade adds to the database."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    letters = sorted({c for word in log._TRIGGERS for c in word})
    for letter in letters:
        for c in set(re.findall("(?i)" + re.escape(letter), every)):
            assert c.translate(log._FOLD).lower() == letter, (hex(ord(c)), letter)
            for word in (w.replace(letter, c) for w in log._TRIGGERS if letter in w):
                text = f"x {word} abc {word}=abc {word}: abc"
                assert scrub(text) == _scrub_by_patterns(text)


VERIFIER = SignatureVerifier()


@PROPERTIES
@given(
    st.binary(max_size=2000),
    st.dictionaries(
        st.sampled_from(["X-GHL-Signature", "X-WH-Signature"]),
        TEXT | st.binary(max_size=600).map(lambda b: b.hex()),
        max_size=2,
    ),
)
def test_any_signature_header_verifies_or_is_refused_never_raises(body, headers):
    assert VERIFIER.verify(body, headers) is None

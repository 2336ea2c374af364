"""Issue 11 §3: each defect the black-box hostile-input run found, reproduced against the fakes.

Each test failed on the code before its fix (a 500, a stuck record, an upstream request that must
not leave); together with test_hostile_fuzz.py they keep hostile input from coming back.
"""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from test_inbound import reply
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from castghld.fakes import wait_for
from castghld.inbound import received_at
from castghld.pacing import MAX_RETRY_AFTER, parse_interval_ms, parse_retry_after

SECRET = "inbound-secret"  # tests/conftest.py BASE_CONFIG
MESSAGES = "/api/ghl/v1/webhook/messages"
APP = "/api/ghl/v1/webhook/app"
INBOUND = "/api/cast/v1/webhook/inbound"
DEEP = b"[" * 100_000


async def post_inbound(bridge, body: bytes | dict):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}
    request = HTTPRequest(bridge.daemon.url + INBOUND, method="POST", body=raw, headers=headers)
    return await AsyncHTTPClient().fetch(request, raise_error=False)


def error_code(response) -> str:
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.body)
    assert set(body) == {"error", "message"}
    return body["error"]


# -- deeply nested JSON ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_deeply_nested_inbound_body_is_400_json(bridge):
    await bridge.start()
    response = await post_inbound(bridge, DEEP)
    assert response.code == 400
    assert error_code(response) == "invalid_json"


@pytest.mark.gen_test(timeout=20)
async def test_deeply_nested_signed_webhooks_are_never_5xx(bridge):
    await bridge.start()
    for path in (MESSAGES, APP):
        response = await bridge.ghl.post_webhook(bridge.daemon.url + path, DEEP)
        assert response.code < 500, (path, response.body)
        assert b"Traceback" not in response.body
    assert (await bridge.post_message()).code == 200


# -- received_at at the calendar's edges -------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["0001-01-01T00:00:00", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+14:00"]
)
def test_unrepresentable_received_at_becomes_now(value):
    before = time.time()
    when = received_at(value)
    stamp = time.mktime(time.strptime(when, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert before - 2 <= stamp <= time.time() + 2


@pytest.mark.gen_test(timeout=20)
async def test_reply_dated_at_the_calendar_edge_reaches_ghl(bridge):
    await bridge.start()
    await bridge.install("loc1")
    response = await post_inbound(bridge, reply(received_at="9999-12-31T23:59:59-05:00"))
    assert response.code == 200, response.body
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    assert bridge.ghl.inbound_messages[0]["date"][:4] == time.strftime("%Y", time.gmtime())


# -- Retry-After -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["inf", "Infinity", "1e308", "999999999999", "Fri, 31 Dec 9999 23:59:59 GMT"]
)
def test_huge_retry_after_is_capped(value):
    assert parse_retry_after(value) == MAX_RETRY_AFTER


@pytest.mark.parametrize("value", ["nan", "-nan", "", "soon"])
def test_unreadable_retry_after_is_none(value):
    assert parse_retry_after(value) is None


def test_negative_retry_after_is_zero():
    assert parse_retry_after("-inf") == 0.0


def test_huge_rate_limit_interval_is_capped_and_never_raises():
    assert parse_interval_ms("9" * 5000) is None  # int() of 5000 digits raises ValueError
    assert parse_interval_ms("99999999999999") == MAX_RETRY_AFTER
    assert parse_interval_ms("10000") == 10.0
    assert parse_interval_ms("-5") is None


# -- ids at the door, quoted in upstream URLs --------------------------------------------------


def statuses(ghl, message_id: str) -> list[str]:
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


@pytest.mark.parametrize(
    "field",
    [{"messageId": "x/../../../probe"}, {"messageId": "nul\x00id"}, {"locationId": "lóc1"}]
    + [{"messageId": bad} for bad in ("", "a" * 129, "..", "a b", "m\n1", "50%", None, {"a": 1})],
)
@pytest.mark.gen_test(timeout=20)
async def test_unusable_ids_are_200_counted_and_never_stored(bridge, field):
    await bridge.start()
    await bridge.install("loc1")
    response = await bridge.post_message(field)
    assert response.code == 200
    assert json.loads(response.body)["status"] == "ignored"
    assert bridge.daemon.metrics.webhooks.labels("messages", "unusable")._value.get() == 1
    assert bridge.daemon.outbox.records == {}
    assert bridge.daemon.outbox.journal.entries_written == 0
    assert bridge.ghl.calls_to("PUT", "/probe/status") == []


@pytest.mark.gen_test(timeout=20)
async def test_ids_are_quoted_in_the_status_path(bridge):
    await bridge.start()
    await bridge.install("loc1")
    message_id = "m:1@x;y=z,(a)'b'!$&*+~"
    assert (await bridge.post_message(messageId=message_id)).code == 200
    await wait_for(lambda: statuses(bridge.ghl, message_id) == ["pending", "delivered"])
    [call, *_] = bridge.ghl.calls_to("PUT", "/conversations/messages/")
    assert call.path.startswith("/conversations/messages/m%3A1%40x%3By%3Dz")


@pytest.mark.gen_test(timeout=20)
async def test_numeric_ids_are_read_as_their_decimal_form(bridge):
    await bridge.start()
    await bridge.install("loc1")
    response = await bridge.post_message(messageId=1234567)
    assert json.loads(response.body) == {"status": "accepted", "messageId": "1234567"}
    await wait_for(lambda: statuses(bridge.ghl, "1234567") == ["pending", "delivered"])


# -- issue 8 §5: an authentic webhook is never 4xx for its shape --------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_attachment_objects_are_sent_with_their_urls(bridge):
    await bridge.start()
    await bridge.install("loc1")
    attachments = [{"url": "https://x.example/a.png", "type": "image/png"}, "https://x.example/b"]
    response = await bridge.post_message(message="See", attachments=attachments)
    assert response.code == 200
    await wait_for(lambda: bridge.cast.sent)
    assert bridge.cast.sent[0]["message"] == "See\nhttps://x.example/a.png\nhttps://x.example/b"


@pytest.mark.gen_test(timeout=20)
async def test_numbers_for_strings_are_sent(bridge):
    await bridge.start()
    await bridge.install("loc1")
    response = await bridge.post_message(phone=639171234567, message=42, contactId=7, userId=None)
    assert response.code == 200
    await wait_for(lambda: bridge.cast.sent)
    assert bridge.cast.sent[0]["to"] == "+639171234567"
    assert bridge.cast.sent[0]["message"] == "42"


@pytest.mark.gen_test(timeout=20)
async def test_unusable_optional_field_is_reported_failed_with_the_reason(bridge):
    await bridge.start()
    await bridge.install("loc1")
    response = await bridge.post_message(type={"sms": True}, attachments=[{"href": "x"}])
    assert response.code == 200
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["failed"])
    error = bridge.ghl.statuses["msg-1"][0]["error"]
    assert error["code"] == "INVALID_FIELD"
    assert "type is an object" in error["message"]
    assert "attachments[0]" in error["message"]
    assert bridge.cast.sent == []


# -- the operator's own number in logs ---------------------------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_operator_number_is_never_logged_in_full(bridge, caplog):
    caplog.set_level("DEBUG")
    await bridge.start()
    # No location installed: the reply is logged as unrouted, then delivered after the install.
    assert (await post_inbound(bridge, reply(to="09171234567"))).code == 200
    await bridge.install("loc1")
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "to=[number]" in logged
    for form in ("9171234567", "917 123 4567"):
        assert form not in logged


# -- the OAuth callback is not an amplifier ----------------------------------------------------


async def callback(bridge, code: str, ip: str = "203.0.113.7"):
    url = f"{bridge.daemon.url}/oauth/callback?code={code}"
    return await AsyncHTTPClient().fetch(url, headers={"X-Real-IP": ip}, raise_error=False)


def token_calls(bridge) -> int:
    return len(bridge.ghl.calls_to("POST", "/oauth/token"))


@pytest.mark.gen_test(timeout=20)
async def test_junk_codes_from_one_client_are_rate_limited(bridge, caplog):
    await bridge.start()
    for n in range(5):
        assert (await callback(bridge, f"junk-{n}")).code == 400
    assert token_calls(bridge) == 5
    response = await callback(bridge, "junk-5")
    assert response.code == 429
    assert response.headers["Content-Type"].startswith("text/html")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert token_calls(bridge) == 5
    # Another client still installs.
    bridge.ghl.add_auth_code("good", location_id="loc1")
    assert (await callback(bridge, "good", ip="198.51.100.1")).code == 200
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refused and all(r.levelname == "WARNING" for r in refused)
    assert not any("junk-" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_junk_codes_from_many_clients_are_rate_limited_in_all(bridge):
    await bridge.start()
    for n in range(30):
        assert (await callback(bridge, f"junk-{n}", ip=f"192.0.2.{n}")).code == 400
    response = await callback(bridge, "junk-x", ip="192.0.2.200")
    assert response.code == 429
    assert token_calls(bridge) == 30


@pytest.mark.gen_test(timeout=30)
async def test_successful_installs_do_not_use_up_the_limit(bridge):
    await bridge.start()
    for n in range(12):
        bridge.ghl.add_auth_code(f"code-{n}", location_id=f"loc{n}")
        assert (await callback(bridge, f"code-{n}")).code == 200
    assert len(bridge.daemon.installations.location_ids()) == 12


# -- one damaged journal line does not keep the daemon down ------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_damaged_journal_line_is_quarantined_and_the_daemon_starts(bridge, caplog):
    await bridge.start()
    await bridge.install("loc1")
    for n in range(3):
        assert (await bridge.post_message(messageId=f"m{n}")).code == 200
    await wait_for(
        lambda: all(statuses(bridge.ghl, f"m{n}")[-1:] == ["delivered"] for n in range(3))
    )
    await bridge.stop()
    journal = os.path.join(bridge.config_dir.state_dir, "outbox.log")
    with open(journal, "rb") as f:
        lines = f.read().split(b"\n")
    assert len(lines) > 4
    lines[1] = b"not base64 at all!"
    lines[3] = lines[3][:-8] + b"AAAAAAAA"  # fails authentication
    with open(journal, "wb") as f:
        f.write(b"\n".join(lines))
    caplog.clear()
    daemon = await bridge.start()
    assert daemon.metrics.outbox_quarantined._value.get() == 2
    quarantine = os.path.join(bridge.config_dir.state_dir, "outbox.quarantine")
    assert stat.S_IMODE(os.stat(quarantine).st_mode) == 0o600
    with open(quarantine, "rb") as f:
        assert f.read() == lines[1] + b"\n" + lines[3] + b"\n"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("2 unreadable record(s)" in m for m in errors)
    assert (await bridge.post_message(messageId="after")).code == 200
    await wait_for(lambda: statuses(bridge.ghl, "after")[-1:] == ["delivered"])

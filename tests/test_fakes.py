"""The fakes are strict: each test shows one contract rule that a wrong client would trip."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from pathlib import Path
from urllib.parse import urlencode

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from castghld.fakes import FakeCast, FakeGHL, FaultMix, wait_for

CAST_KEY = "cast_test_key"


@pytest.fixture
def ghl(io_loop):
    fake = FakeGHL(client_id="cid", client_secret="csecret")
    io_loop.run_sync(fake.start)
    yield fake
    io_loop.run_sync(fake.stop)


@pytest.fixture
def cast(io_loop):
    fake = FakeCast(api_keys={CAST_KEY: "acct"})
    io_loop.run_sync(fake.start)
    yield fake
    io_loop.run_sync(fake.stop)


async def fetch(url: str, method: str = "GET", body: str | None = None, **headers: str):
    request = HTTPRequest(url, method=method, body=body, headers=headers)
    return await AsyncHTTPClient().fetch(request, raise_error=False)


async def refresh(ghl: FakeGHL, refresh_token: str) -> HTTPResponse:
    form = {
        "client_id": "cid",
        "client_secret": "csecret",
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "user_type": "Location",
    }
    content_type = {"Content-Type": "application/x-www-form-urlencoded"}
    return await fetch(ghl.url + "/oauth/token", "POST", urlencode(form), **content_type)


async def send(cast: FakeCast, idempotency_key: str, message: str = "hello") -> HTTPResponse:
    body = json.dumps({"to": "+639171234567", "message": message})
    headers = {
        "X-API-Key": CAST_KEY,
        "X-Idempotency-Key": idempotency_key,
        "Content-Type": "application/json",
    }
    return await fetch(cast.url + "/api/v1/sms/send", "POST", body, **headers)


@pytest.mark.gen_test
async def test_reused_refresh_token_gets_invalid_grant(ghl):
    pair = ghl.issue_tokens("loc1")
    first = await refresh(ghl, pair["refresh_token"])
    assert first.code == 200
    assert json.loads(first.body)["locationId"] == "loc1"
    second = await refresh(ghl, pair["refresh_token"])
    assert second.code == 400
    assert json.loads(second.body)["error"] == "invalid_grant"
    assert ghl.refresh_reuse == 1
    assert ghl.refresh_count["loc1"] == 1
    assert ghl.violations == []


@pytest.mark.gen_test
async def test_inactive_location_refresh_keeps_the_token(ghl):
    pair = ghl.issue_tokens("loc1")
    ghl.deactivate("loc1")
    answer = await refresh(ghl, pair["refresh_token"])
    assert (answer.code, json.loads(answer.body)["message"]) == (400, "Location is not active")
    ghl.reactivate("loc1")
    assert (await refresh(ghl, pair["refresh_token"])).code == 200


@pytest.mark.gen_test
async def test_status_without_version_header_is_a_violation(ghl):
    token = ghl.issue_tokens("loc1")["access_token"]
    answer = await fetch(
        ghl.url + "/conversations/messages/m1/status",
        "PUT",
        json.dumps({"status": "delivered"}),
        **{"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert answer.code == 400
    assert ghl.violations == ["PUT /conversations/messages/m1/status: Version None, not 2021-04-15"]
    assert ghl.statuses == {}
    assert len(ghl.calls_to("PUT", "/conversations/messages/")) == 1


@pytest.mark.gen_test
async def test_status_error_only_with_failed(ghl):
    token = ghl.issue_tokens("loc1")["access_token"]
    headers = {
        "Authorization": f"Bearer {token}",
        "Version": "2021-04-15",
        "Content-Type": "application/json",
    }
    url = ghl.url + "/conversations/messages/m1/status"
    error = {"code": "X", "type": "sms", "message": "no"}
    wrong = await fetch(url, "PUT", json.dumps({"status": "delivered", "error": error}), **headers)
    right = await fetch(url, "PUT", json.dumps({"status": "failed", "error": error}), **headers)
    assert (wrong.code, right.code) == (422, 200)
    assert right.headers["X-RateLimit-Remaining"] == "98"
    assert len(ghl.violations) == 1
    assert ghl.statuses["m1"] == [{"status": "failed", "error": error}]


@pytest.mark.gen_test
async def test_idempotency_key_replays_the_first_answer(cast):
    first = await send(cast, "ghl-msg-1")
    second = await send(cast, "ghl-msg-1")
    assert first.code == second.code == 200
    assert json.loads(first.body) == json.loads(second.body)
    assert json.loads(first.body)["message_id"].startswith("CAST")
    assert len(cast.sent) == 1
    assert cast.replays == 1
    assert cast.violations == []


@pytest.mark.gen_test
async def test_scripted_failure_does_not_store_the_idempotency_key(cast):
    cast.fail_next("send", 503)
    failed = await send(cast, "ghl-msg-1")
    assert failed.code == 503
    assert json.loads(failed.body)["error_code"] == "SERVICE_UNAVAILABLE"
    assert (await send(cast, "ghl-msg-1")).code == 200
    assert (len(cast.sent), cast.replays) == (1, 0)


@pytest.mark.gen_test
async def test_sending_faster_than_the_account_limit_is_a_violation(cast):
    cast.messages_per_second = 2
    codes = [(await send(cast, f"m{i}")).code for i in range(3)]
    assert codes == [200, 200, 429]
    assert cast.max_sends_in_window() == 2
    assert cast.violations == ["POST /api/v1/sms/send: more than 2 sends in 1 s for acct"]


@pytest.mark.gen_test
async def test_fault_mix_error_is_counted_not_a_violation_and_sends_nothing(cast):
    cast.fault_mix("send", FaultMix(random.Random(1), {503: 1.0}))
    answer = await send(cast, "ghl-msg-1")
    assert answer.code == 503
    assert json.loads(answer.body)["error_code"] == "SERVICE_UNAVAILABLE"
    assert (cast.sent, cast.violations, cast.faults) == ([], [], {("send", "503"): 1})
    cast.fault_mix("send", None)
    assert (await send(cast, "ghl-msg-1")).code == 200


@pytest.mark.gen_test
async def test_fault_mix_429_burst_answers_every_request_with_retry_after(cast):
    cast.fault_mix("send", FaultMix(random.Random(1), burst=1.0, burst_seconds=60, retry_after="3"))
    answers = [await send(cast, f"m{i}") for i in range(3)]
    assert [(a.code, a.headers["Retry-After"]) for a in answers] == [(429, "3")] * 3
    assert cast.sent == [] and cast.violations == []


@pytest.mark.gen_test
async def test_fault_mix_slow_answer_takes_effect_and_arrives_late(cast):
    cast.fault_mix("send", FaultMix(random.Random(1), slow=1.0, slow_seconds=0.3))
    started = asyncio.get_running_loop().time()
    assert (await send(cast, "ghl-msg-1")).code == 200
    assert asyncio.get_running_loop().time() - started >= 0.3
    assert len(cast.sent) == 1 and [c.path for c in cast.late] == ["/api/v1/sms/send"]


def test_fault_mix_rejects_probabilities_over_one():
    with pytest.raises(ValueError):
        FaultMix(random.Random(1), {500: 0.7, 503: 0.7})


@pytest.mark.gen_test
async def test_cached_transient_error_replays_under_the_key_until_it_expires(cast):
    cast.error_cache_seconds = 0.3
    cast.fail_next("send", 500)
    assert (await send(cast, "ghl-msg-1")).code == 500
    assert (await send(cast, "ghl-msg-1")).code == 500  # the cached answer, nothing sent
    assert (await send(cast, "ghl-msg-2")).code == 200  # another key is not affected
    assert (cast.cached_error_replays, len(cast.sent)) == (1, 1)
    await asyncio.sleep(0.3)  # the cache entry's lifetime, by definition
    assert (await send(cast, "ghl-msg-1")).code == 200
    assert len(cast.sent) == 2 and cast.violations == []


@pytest.mark.gen_test
async def test_hung_request_is_logged_and_answers_after_release(cast):
    cast.hang("send")
    pending = asyncio.ensure_future(send(cast, "ghl-msg-1"))
    await wait_for(lambda: cast.hung("send") == 1)
    assert len(cast.calls) == 1
    assert cast.sent == []
    cast.release("send")
    assert (await pending).code == 200


@pytest.mark.gen_test
async def test_wait_for_names_the_condition_on_timeout():
    with pytest.raises(AssertionError, match="never_true"):
        await wait_for(lambda: "never_true" == "", timeout=0.05)


class Capture(tornado.web.RequestHandler):
    received: list[tuple[bytes, dict[str, str]]] = []

    def post(self) -> None:
        self.received.append((self.request.body, dict(self.request.headers)))


@pytest.mark.parametrize("alg", ["ed25519", "rsa", "ecdsa"])
def test_webhook_signature_verifies_with_the_written_public_key(tmp_path, alg):
    ghl = FakeGHL()
    paths = ghl.write_public_keys(tmp_path)
    public_key = serialization.load_pem_public_key(
        Path(next(p for p in paths if alg in p)).read_bytes()
    )
    body = json.dumps({"type": "SMS", "messageId": "m1", "locationId": "loc1"}).encode()
    headers = ghl.sign(body, alg)
    signature = base64.b64decode(headers.get("X-GHL-Signature") or headers["X-WH-Signature"])
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, body)
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(signature, body, ec.ECDSA(hashes.SHA256()))


@pytest.mark.gen_test
async def test_post_webhook_sends_the_signed_body(ghl, cast):
    Capture.received = []
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/hook", Capture)]))
    server.add_sockets([sock])
    try:
        payload = {"type": "SMS", "messageId": "m1", "locationId": "loc1"}
        answer = await ghl.post_webhook(f"http://127.0.0.1:{port}/hook", payload)
    finally:
        server.stop()
        await server.close_all_connections()
    assert answer.code == 200
    body, headers = Capture.received[0]
    assert json.loads(body) == payload
    assert headers["X-Ghl-Signature"] == ghl.sign(body)["X-GHL-Signature"]
    assert ghl.webhook_messages == {"m1": "loc1"}


async def installed_page(ghl: FakeGHL, token: str, skip: int, limit: int = 100) -> dict:
    query = urlencode(
        {"companyId": "ag", "appId": "cid", "isInstalled": "true", "skip": skip, "limit": limit}
    )
    answer = await fetch(
        f"{ghl.url}/oauth/installedLocations?{query}",
        Authorization=f"Bearer {token}",
        Version="2021-07-28",
    )
    assert answer.code == 200, answer.body
    return json.loads(answer.body)


@pytest.mark.gen_test
async def test_installed_locations_paging_switches(ghl):
    locations = [f"loc{n:02d}" for n in range(30)]
    token = ghl.issue_company_tokens("ag", locations)["access_token"]
    ghl.installed_page_cap = 20  # asked for 100: serves 20
    page = await installed_page(ghl, token, skip=0)
    assert [e["_id"] for e in page["locations"]] == locations[:20] and page["count"] == 30
    ghl.installed_ignores_skip = True
    page = await installed_page(ghl, token, skip=20)
    assert [e["_id"] for e in page["locations"]] == locations[:20]
    ghl.installed_ignores_skip = False
    ghl.hidden_from_list.add("loc29")  # still mintable, not listed
    ghl.uninstall_after_pages("loc00", pages=1)
    page = await installed_page(ghl, token, skip=20)
    assert [e["_id"] for e in page["locations"]] == locations[20:29] and page["count"] == 29
    page = await installed_page(ghl, token, skip=0)  # loc00 left after the page before
    assert page["locations"][0]["_id"] == "loc01" and page["count"] == 28
    assert ghl.violations == []

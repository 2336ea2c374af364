"""Fake Cast's account side: wallets spent by parts, postpaid limits, key and account switches,
idempotency scope and cached refusals, and the /api/v1/account/* routes (SPEC §5)."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from castghld.fakes import UNLIMITED_CREDITS, FakeCast
from castghld.parts import message_parts

KEY = "cast_live_key_a"


@pytest.fixture
def cast(io_loop):
    fake = FakeCast(api_keys={KEY: "acct"})
    io_loop.run_sync(fake.start)
    yield fake
    io_loop.run_sync(fake.stop)
    assert fake.violations == []


async def get(cast: FakeCast, path: str, key: str = KEY) -> tuple[int, dict]:
    request = HTTPRequest(cast.url + path, headers={"X-API-Key": key})
    answer = await AsyncHTTPClient().fetch(request, raise_error=False)
    return answer.code, json.loads(answer.body)


async def send(
    cast: FakeCast, idempotency_key: str, message: str = "hello", key: str = KEY
) -> HTTPResponse:
    headers = {
        "X-API-Key": key,
        "X-Idempotency-Key": idempotency_key,
        "Content-Type": "application/json",
    }
    body = json.dumps({"to": "+639171234567", "message": message})
    request = HTTPRequest(cast.url + "/api/v1/sms/send", "POST", body=body, headers=headers)
    return await AsyncHTTPClient().fetch(request, raise_error=False)


def code_of(answer: HTTPResponse) -> tuple[int, str | None]:
    return answer.code, json.loads(answer.body).get("error_code")


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("[" * 80, 1),  # extension characters take two septets
        ("[" * 81, 2),
        ("ñ" * 160, 1),  # ñ is in the GSM-7 basic set
        ("ā" * 70, 1),
        ("ā" * 71, 2),
        ("ā" * 134, 2),
        ("ā" * 135, 3),
        ("😀" * 35, 1),  # two UTF-16 code units each
        ("😀" * 36, 2),
        ("", 1),
    ],
)
def test_parts_are_counted_as_cast_counts_them(text, parts):
    assert message_parts(text) == parts


@pytest.mark.gen_test
async def test_an_account_without_a_wallet_is_never_refused_for_credits(cast):
    assert code_of(await send(cast, "m1", "a" * 5000)) == (200, None)
    assert await get(cast, "/api/v1/account/balance") == (
        200,
        {"success": True, "credits": UNLIMITED_CREDITS, "currency": "PHP"},
    )


@pytest.mark.gen_test
async def test_sends_spend_the_wallet_by_parts_and_a_topup_account_refuses_when_empty(cast):
    cast.set_credits("acct", 3)
    answer = await send(cast, "m1", "a" * 200)
    assert json.loads(answer.body)["parts"] == 2
    assert (await get(cast, "/api/v1/account/balance"))[1]["credits"] == 1
    assert code_of(await send(cast, "m2", "a" * 200)) == (402, "INSUFFICIENT_CREDITS")
    assert code_of(await send(cast, "m3", "short")) == (200, None)
    assert (await get(cast, "/api/v1/account/balance"))[1]["credits"] == 0
    cast.top_up("acct", 5)
    assert code_of(await send(cast, "m2", "a" * 200)) == (200, None)
    assert len(cast.sent) == 3
    assert cast.refusals == {"INSUFFICIENT_CREDITS": 1}


@pytest.mark.gen_test
async def test_a_postpaid_account_goes_negative_to_its_limit(cast):
    cast.set_credits("acct", 0, billing_type="postpaid", credit_limit=2)
    assert code_of(await send(cast, "m1")) == (200, None)
    assert code_of(await send(cast, "m2")) == (200, None)
    assert code_of(await send(cast, "m3")) == (402, "CREDIT_LIMIT_REACHED")
    code, profile = await get(cast, "/api/v1/account/profile")
    assert (code, profile["credits"], profile["billing_type"]) == (200, -2, "postpaid")
    assert profile["is_active"] is True and "sms" in profile["allowed_channels"]


@pytest.mark.parametrize(
    ("switch", "error_code"),
    [
        (lambda c: c.revoke_key(KEY), "API_KEY_REVOKED"),
        (lambda c: c.expire_key(KEY), "API_KEY_EXPIRED"),
        (lambda c: c.deactivate("acct"), "USER_INACTIVE"),
        (lambda c: c.refuse_ip("acct"), "IP_NOT_WHITELISTED"),
    ],
)
@pytest.mark.gen_test
async def test_key_and_account_switches_refuse_every_route(cast, switch, error_code):
    switch(cast)
    assert code_of(await send(cast, "m1")) == (403, error_code)
    code, body = await get(cast, "/api/v1/account/balance")
    assert (code, body["error_code"]) == (403, error_code)
    assert cast.sent == []


@pytest.mark.gen_test
async def test_a_channel_not_allowed_refuses_sends_only(cast):
    cast.allow_channels("acct", ["otp"])
    assert code_of(await send(cast, "m1")) == (403, "CHANNEL_NOT_ALLOWED")
    assert (await get(cast, "/api/v1/account/balance"))[0] == 200


@pytest.mark.gen_test
async def test_an_unknown_key_gets_401_on_account_routes(cast):
    code, body = await get(cast, "/api/v1/account/balance", key="cast_live_nope")
    assert (code, body["error_code"]) == (401, "INVALID_API_KEY")


@pytest.mark.gen_test
async def test_a_second_key_of_the_account_is_the_same_account(cast):
    cast.add_key("cast_live_key_b", "acct")
    cast.set_credits("acct", 5)
    assert code_of(await send(cast, "m1", key="cast_live_key_b")) == (200, None)
    assert (await get(cast, "/api/v1/account/balance"))[1]["credits"] == 4
    [sent] = cast.sent
    code, body = await get(cast, f"/api/v1/sms/status/{sent['message_id']}")
    assert (code, body["status"]) == (200, "delivered")


@pytest.mark.gen_test
async def test_idempotency_is_per_key_by_default_and_per_account_when_configured(cast):
    cast.add_key("cast_live_key_b", "acct")
    await send(cast, "m1")
    await send(cast, "m1", key="cast_live_key_b")
    assert (len(cast.sent), cast.replays) == (2, 0)
    cast.idempotency_scope = "account"
    await send(cast, "m2")
    replay = await send(cast, "m2", key="cast_live_key_b")
    assert replay.headers["X-Idempotent-Replay"] == "true"
    assert (len(cast.sent), cast.replays) == (3, 1)


@pytest.mark.gen_test
async def test_a_lookup_scope_of_key_hides_a_message_from_the_accounts_other_keys(cast):
    cast.add_key("cast_live_key_b", "acct")
    cast.lookup_scope = "key"
    await send(cast, "m1")
    path = f"/api/v1/sms/status/{cast.sent[0]['message_id']}"
    assert (await get(cast, path))[0] == 200
    code, body = await get(cast, path, key="cast_live_key_b")
    assert (code, body["error_code"]) == (404, "NOT_FOUND")


@pytest.mark.gen_test
async def test_refusals_are_not_cached_under_the_idempotency_key_by_default(cast):
    cast.set_credits("acct", 0)
    assert code_of(await send(cast, "m1")) == (402, "INSUFFICIENT_CREDITS")
    cast.top_up("acct", 1)
    assert code_of(await send(cast, "m1")) == (200, None)


@pytest.mark.gen_test
async def test_cached_refusals_are_replayed_to_the_same_key_after_the_fix(cast):
    cast.cache_refusals = True
    cast.set_credits("acct", 0)
    assert code_of(await send(cast, "m1")) == (402, "INSUFFICIENT_CREDITS")
    cast.top_up("acct", 1)
    replay = await send(cast, "m1")
    assert code_of(replay) == (402, "INSUFFICIENT_CREDITS")
    assert replay.headers["X-Idempotent-Replay"] == "true"
    assert code_of(await send(cast, "m1-retry")) == (200, None)
    assert len(cast.sent) == 1


@pytest.mark.gen_test
async def test_usage_counts_each_day_by_account_with_parts(cast):
    cast.add_key("cast_live_other", "other")
    cast.today = lambda: "2026-01-02"
    await send(cast, "m1", "a" * 200)
    cast.set_delivery("+639171234567", "failed")
    cast.today = lambda: "2026-01-03"
    await send(cast, "m2")
    await send(cast, "m3", key="cast_live_other")
    cast.send_outside("acct", "+639170000000", "hi")
    cast.set_delivery("+639170000000", "delivered")
    code, usage = await get(cast, "/api/v1/account/usage?from=2026-01-01&to=2026-01-31")
    assert code == 200
    assert usage["daily"] == [
        {"date": "2026-01-03", "total": 2, "sent": 1, "failed": 1, "parts": 2},
        {"date": "2026-01-02", "total": 1, "sent": 0, "failed": 1, "parts": 2},
    ]
    assert (usage["total"], usage["total_parts"], usage["total_failed"]) == (3, 4, 2)
    code, usage = await get(cast, "/api/v1/account/usage?from=2026-01-03")
    assert [d["date"] for d in usage["daily"]] == ["2026-01-03"]


@pytest.mark.gen_test
async def test_sender_ids_and_unsubscribed_are_listed(cast):
    cast.set_sender_ids("acct", [{"sender_id": "SHOP", "label": "shop", "channel": "sms"}])
    cast.unsubscribe("acct", "+639171234567", "SHOP")
    code, body = await get(cast, "/api/v1/account/sender-ids")
    assert (code, body["sender_ids"]) == (
        200,
        [{"sender_id": "SHOP", "label": "shop", "channel": "sms"}],
    )
    code, body = await get(cast, "/api/v1/account/unsubscribed")
    [entry] = body["data"]
    assert (entry["phone"], entry["sender_id"]) == ("+639171234567", "SHOP")

"""Opt-outs: a send Cast refuses because the number opted out of the sender ID is reported failed
with a reason that says so, and neither the number nor the text reaches the log."""

from __future__ import annotations

import json
import logging

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from castghld.fakes import wait_for


@pytest.mark.gen_test
async def test_fake_cast_refuses_a_send_to_a_number_that_opted_out_of_its_sender_id(fake_cast):
    fake_cast.unsubscribe("acct", "09171234567", "CASTDEMO")
    url = fake_cast.url + "/api/v1/sms/send"

    async def send(key: str, **body) -> tuple[int, dict]:
        headers = {
            "X-API-Key": "cast_test_key",
            "Content-Type": "application/json",
            "X-Idempotency-Key": key,
        }
        request = HTTPRequest(url, method="POST", body=json.dumps(body), headers=headers)
        response = await AsyncHTTPClient().fetch(request, raise_error=False)
        return response.code, json.loads(response.body)

    code, answer = await send("k1", to="+639171234567", message="hi", sender_id="CASTDEMO")
    assert (code, answer["error_code"]) == (400, "VALIDATION_ERROR")
    assert (await send("k2", to="+639171234567", message="hi", sender_id="OTHER"))[0] == 200
    assert (await send("k3", to="09181234567", message="hi", sender_id="CASTDEMO"))[0] == 200
    assert fake_cast.violations == []


def statuses(ghl, message_id: str) -> list[dict]:
    return ghl.statuses.get(message_id, [])


@pytest.mark.gen_test(timeout=30)
async def test_a_send_refused_for_an_opt_out_is_reported_failed_saying_so(bridge, caplog):
    caplog.set_level(logging.DEBUG)
    bridge.cast.unsubscribe("acct", "+639171234567", "CASTDEMO")
    await bridge.start({"cast": {"sender_id": "CASTDEMO"}})
    await bridge.install("loc1")
    for n in range(3):  # a campaign meets several opted-out refusals: one read of the list
        await bridge.post_message(messageId=f"m{n}", phone="09171234567", message="promo 50%")
    await bridge.post_message(messageId="other", phone="09181234567")
    for n in range(3):
        await wait_for(lambda n=n: [s["status"] for s in statuses(bridge.ghl, f"m{n}")])
    await wait_for(lambda: "delivered" in [s["status"] for s in statuses(bridge.ghl, "other")])
    [report] = statuses(bridge.ghl, "m0")
    assert report["status"] == "failed"
    assert report["error"]["code"] == "VALIDATION_ERROR"
    assert report["error"]["message"] == (
        "the recipient opted out of sender ID 'CASTDEMO' (Cast's unsubscribed list); "
        "Cast refused the send with VALIDATION_ERROR"
    )
    assert len(bridge.cast.calls_to("GET", "/api/v1/account/unsubscribed")) == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "opted out of sender ID 'CASTDEMO'" in logged
    assert "9171234567" not in logged and "promo" not in logged


@pytest.mark.gen_test(timeout=30)
async def test_a_refusal_that_is_not_an_opt_out_keeps_casts_reason(bridge):
    await bridge.start({"cast": {"sender_id": "CASTDEMO"}})
    await bridge.install("loc1")
    refused = {"success": False, "error": "Message rejected", "error_code": "VALIDATION_ERROR"}
    bridge.cast.fail_next("send", 400, refused)
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1"))
    [report] = statuses(bridge.ghl, "msg-1")
    assert report["error"] == {
        "code": "VALIDATION_ERROR",
        "type": "saas",
        "message": "Message rejected",
    }

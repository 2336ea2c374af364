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

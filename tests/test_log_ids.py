"""One message can be followed through the log by its id: the webhook that brought it (accepted
or duplicate) names it, and every JSON line about an inbound reply carries its Cast id."""

from __future__ import annotations

import json
import logging

import pytest

from castghld.fakes import wait_for
from castghld.log import _JSONFormatter, _TextFormatter
from tests.test_inbound import post, reply


@pytest.mark.gen_test(timeout=30)
async def test_accepted_and_duplicate_webhooks_are_logged_with_their_message_id(bridge, caplog):
    caplog.set_level(logging.INFO, logger="castghld.access")
    await bridge.start()
    await bridge.install("loc1")
    assert (await bridge.post_message()).code == 200
    assert (await bridge.post_message()).code == 200  # GHL's retry: a duplicate
    access = [
        r
        for r in caplog.records
        if r.name == "castghld.access" and "webhook/messages" in r.getMessage()
    ]
    assert len(access) == 2, [r.getMessage() for r in access]
    for record in access:
        assert "message=msg-1 location=loc1" in _TextFormatter(journal=False).format(record)
        fields = json.loads(_JSONFormatter(journal=False).format(record))
        assert fields["message_id"] == "msg-1" and fields["location_id"] == "loc1"


@pytest.mark.gen_test(timeout=30)
async def test_every_json_line_about_an_inbound_reply_carries_its_cast_id(bridge, caplog):
    caplog.set_level(logging.DEBUG, logger="castghld")
    await bridge.start()
    assert (await post(bridge, reply("CASTIN7"))).code == 200  # no location yet: unrouted
    await bridge.install("loc1")
    await wait_for(lambda: "delivered to GHL" in caplog.text, timeout=20)
    lines = [
        json.loads(_JSONFormatter(journal=False).format(r))
        for r in caplog.records
        if "CASTIN7" in r.getMessage()
    ]
    assert lines
    for line in lines:
        assert line.get("cast_id") == "CASTIN7", line
    assert any(
        line.get("outcome") == "delivered" and line["location_id"] == "loc1" for line in lines
    )

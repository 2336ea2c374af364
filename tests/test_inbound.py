"""Inbound replies: fake Cast -> castghld -> contact upsert + inbound message on fake GHL."""

from __future__ import annotations

import json
import time

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from castghld.fakes import wait_for
from castghld.inbound import received_at

SECRET = "inbound-secret"  # tests/conftest.py BASE_CONFIG


def reply(message_id: str = "CASTIN1", **fields) -> dict:
    return {
        "message_id": message_id,
        "from": "09181234567",
        "to": "09171234567",
        "message": "Yes, see you tomorrow",
        "received_at": "2026-11-26T09:00:00Z",
        **fields,
    }


async def post(bridge, payload, secret=SECRET):
    return await bridge.cast.post_inbound(
        bridge.daemon.url + "/api/cast/v1/webhook/inbound", secret, payload
    )


@pytest.mark.gen_test(timeout=20)
async def test_reply_becomes_ghl_inbound_message_on_upserted_contact(bridge):
    await bridge.start({"ghl": {"conversation_provider_id": "prov-1"}})
    await bridge.install("loc1")
    response = await post(bridge, reply())
    assert response.code == 200
    assert json.loads(response.body) == {"status": "accepted"}
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    [message] = bridge.ghl.inbound_messages
    contact = bridge.ghl.contacts[("loc1", "+639181234567")]
    assert message["contactId"] == contact["id"]
    assert message["type"] == "SMS"
    assert message["message"] == "Yes, see you tomorrow"
    assert message["altId"] == "CASTIN1"
    assert message["date"] == "2026-11-26T09:00:00Z"
    assert message["conversationProviderId"] == "prov-1"
    assert message["locationId"] == "loc1"


@pytest.mark.gen_test(timeout=20)
async def test_contact_is_upserted_once_per_number_while_cached(bridge):
    await bridge.start()
    await bridge.install("loc1")
    for n, sender in enumerate(["09181234567", "+639181234567", "639181234567", "09190000000"]):
        assert (await post(bridge, reply(f"CAST{n}", **{"from": sender}))).code == 200
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 4)
    assert bridge.ghl.upserts == 2
    assert len({m["contactId"] for m in bridge.ghl.inbound_messages}) == 2


@pytest.mark.gen_test(timeout=20)
async def test_same_message_id_twice_is_one_ghl_message(bridge):
    await bridge.start()
    await bridge.install("loc1")
    first = await post(bridge, reply())
    second = await post(bridge, reply())
    assert json.loads(first.body)["status"] == "accepted"
    assert json.loads(second.body)["status"] == "duplicate"
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    await wait_for(lambda: not bridge.daemon.outbox.records)
    third = await post(bridge, reply())  # a late Cast retry after delivery
    assert json.loads(third.body)["status"] == "duplicate"
    assert len(bridge.ghl.inbound_messages) == 1


@pytest.mark.parametrize("secret", ["wrong", ""])
@pytest.mark.gen_test(timeout=20)
async def test_wrong_or_missing_secret_is_401_and_nothing_sent(bridge, secret):
    await bridge.start()
    await bridge.install("loc1")
    response = await post(bridge, reply(), secret=secret)
    assert response.code == 401
    assert json.loads(response.body)["error"] == "unauthorized"
    request = HTTPRequest(
        bridge.daemon.url + "/api/cast/v1/webhook/inbound",
        method="POST",
        body=json.dumps(reply()),
        headers={"Content-Type": "application/json"},
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code == 401
    assert bridge.daemon.outbox.records == {}
    assert bridge.ghl.calls_to("POST", "/contacts/upsert") == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"message_id": ""}, "message_id"),
        ({"from": 639181234567}, "from"),
        ({"to": None}, "to"),
        ({"message": ["x"]}, "message"),
    ],
)
@pytest.mark.gen_test(timeout=20)
async def test_invalid_fields_are_400_naming_the_field(bridge, payload, field):
    await bridge.start()
    response = await post(bridge, reply(**payload))
    assert response.code == 400
    assert field in json.loads(response.body)["message"]
    assert bridge.daemon.outbox.records == {}


@pytest.mark.gen_test(timeout=20)
async def test_two_locations_are_routed_by_to(bridge):
    numbers = {
        "locations": {
            "locA": {"inbound_numbers": ["09170000001"]},
            "locB": {"inbound_numbers": ["+639170000002", "CASTB"]},
        }
    }
    await bridge.start({"cast": numbers})
    await bridge.install("locA")
    await bridge.install("locB")
    await post(bridge, reply("C1", to="+639170000001"))
    await post(bridge, reply("C2", to="639170000002"))
    await post(bridge, reply("C3", to="castb"))
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 3)
    routed = {m["altId"]: m["locationId"] for m in bridge.ghl.inbound_messages}
    assert routed == {"C1": "locA", "C2": "locB", "C3": "locB"}


@pytest.mark.gen_test(timeout=30)
async def test_unrouted_reply_is_kept_and_delivered_once_a_mapping_appears(bridge):
    await bridge.start()
    await bridge.install("locA")
    await bridge.install("locB")
    response = await post(bridge, reply("LOST", to="09175550000"))
    assert response.code == 200
    await wait_for(lambda: bridge.daemon.outbox.records and bridge.daemon.outbox.running == 0)
    assert bridge.ghl.inbound_messages == []
    assert list(bridge.daemon.outbox.records) == ["in:LOST"]
    await bridge.stop()
    await bridge.start({"cast": {"locations": {"locB": {"inbound_numbers": ["09175550000"]}}}})
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    assert bridge.ghl.inbound_messages[0]["locationId"] == "locB"


@pytest.mark.parametrize(("route", "status"), [("inbound", 429), ("inbound", 500), ("upsert", 502)])
@pytest.mark.gen_test(timeout=30)
async def test_ghl_transient_errors_are_retried(bridge, route, status):
    await bridge.start()
    await bridge.install("loc1")
    bridge.ghl.fail_next(route, status, headers={"Retry-After": "0"} if status == 429 else None)
    await post(bridge, reply())
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1, timeout=20)
    assert len(bridge.ghl.calls_to("POST", "/conversations/messages/inbound")) == (
        2 if route == "inbound" else 1
    )


@pytest.mark.gen_test(timeout=20)
async def test_ghl_401_refreshes_once_and_delivers(bridge):
    await bridge.start()
    await bridge.install("loc1")
    bridge.ghl.expire_access_tokens("loc1")
    await post(bridge, reply())
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    assert bridge.ghl.refresh_count["loc1"] == 1


@pytest.mark.gen_test(timeout=20)
async def test_reply_before_any_install_is_delivered_once_a_location_installs(bridge):
    await bridge.start()
    assert (await post(bridge, reply())).code == 200
    await wait_for(lambda: bridge.daemon.outbox.records and bridge.daemon.outbox.running == 0)
    assert bridge.ghl.inbound_messages == []
    await bridge.install("loc1")
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    await wait_for(lambda: not bridge.daemon.outbox.records)


@pytest.mark.gen_test(timeout=20)
async def test_cached_contact_deleted_in_ghl_is_upserted_again(bridge):
    await bridge.start()
    await bridge.install("loc1")
    await post(bridge, reply("C1"))
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    bridge.ghl.delete_contact("loc1", "+639181234567")
    await post(bridge, reply("C2"))
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 2)
    assert bridge.ghl.upserts == 2
    new_contact = bridge.ghl.contacts[("loc1", "+639181234567")]["id"]
    assert bridge.ghl.inbound_messages[1]["contactId"] == new_contact


@pytest.mark.gen_test(timeout=30)
async def test_graceful_stop_lets_an_inbound_post_finish_without_duplicate(bridge):
    await bridge.start()
    await bridge.install("loc1")
    bridge.ghl.latency = 0.5
    await post(bridge, reply())
    await wait_for(lambda: bridge.ghl.calls_to("POST", "/conversations/messages/inbound"))
    await bridge.stop()
    assert len(bridge.ghl.inbound_messages) == 1
    bridge.ghl.latency = 0.0
    await bridge.start()
    await wait_for(lambda: bridge.daemon.outbox.running == 0)
    assert bridge.daemon.outbox.records == {}
    assert len(bridge.ghl.inbound_messages) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-26T09:00:00Z", "2026-11-26T09:00:00Z"),
        ("2026-11-26T17:00:00+08:00", "2026-11-26T09:00:00Z"),
        ("2026-11-26 17:00:00", "2026-11-26T09:00:00Z"),  # no offset: Manila time
    ],
)
def test_received_at_becomes_utc_iso8601(value, expected):
    assert received_at(value) == expected


def test_unreadable_received_at_becomes_now():
    assert received_at("yesterday")[:4] == time.strftime("%Y", time.gmtime())

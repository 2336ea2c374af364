"""GHL's contract as its docs and SDK show it (issue 8 §3, §4, §6): signatures where the current
scheme decides, and config points (app id, sender ID length)."""

from __future__ import annotations

import json
import time

import pytest
from test_inbound import post, reply
from test_oauth import app_event, post_app_webhook

from castghld.config import ConfigError
from castghld.fakes import wait_for

APP_WEBHOOK = "/api/ghl/v1/webhook/app"


# -- §4 signatures -------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_invalid_ed25519_with_valid_rsa_is_401(bridge):
    await bridge.start()
    await bridge.install("loc1")
    event = app_event("UNINSTALL", "loc1")
    body = json.dumps(event).encode()
    headers = {**bridge.ghl.sign(body, "rsa"), **bridge.ghl.sign(b"another body", "ed25519")}
    response = await post_app_webhook(bridge, event, alg="rsa", headers=headers)
    assert response.code == 401
    assert bridge.daemon.installations.get("loc1") is not None


@pytest.mark.gen_test
async def test_rsa_alone_is_accepted_and_counted_as_legacy(bridge):
    await bridge.start()
    await bridge.install("loc1")
    response = await post_app_webhook(bridge, app_event("UNINSTALL", "loc1"), alg="rsa")
    assert response.code == 200
    assert bridge.daemon.installations.get("loc1") is None
    counter = bridge.daemon.metrics.webhooks.labels("signature", "legacy_rsa")
    assert counter._value.get() == 1


@pytest.mark.gen_test
async def test_legacy_rsa_can_be_turned_off(bridge):
    await bridge.start({"ghl": {"accept_legacy_rsa": False}})
    await bridge.install("loc1")
    response = await post_app_webhook(bridge, app_event("UNINSTALL", "loc1"), alg="rsa")
    assert response.code == 401
    assert bridge.daemon.installations.get("loc1") is not None
    response = await post_app_webhook(bridge, app_event("UNINSTALL", "loc1"))
    assert response.code == 200


def test_verifier_tries_the_key_that_verified_last_first(config_dir, fake_ghl):
    from castghld.signatures import SignatureVerifier, load_public_keys

    keys = load_public_keys(fake_ghl.write_public_keys(config_dir.path))
    verifier = SignatureVerifier(keys)
    body = b'{"type":"INSTALL"}'
    assert verifier.verify(body, fake_ghl.sign(body)) == "ed25519"
    assert verifier._ed25519[0] is keys[0]  # the fake's Ed25519 key, now ahead of GHL's own


# -- §3 inbound: nothing GHL drops counts as delivered, nothing is dropped by us --------------


def inbound_metric(bridge, outcome: str, stage: str = "delivery") -> float:
    return bridge.daemon.metrics.inbound.labels(stage, outcome)._value.get()


@pytest.mark.gen_test(timeout=30)
async def test_ghl_down_longer_than_report_deadline_still_gets_the_reply(bridge):
    await bridge.start({"delivery": {"report_deadline": "1s"}})
    await bridge.install("loc1")
    bridge.ghl.fail_next("inbound", 503, headers={"Retry-After": "1"}, times=2)
    started = time.monotonic()
    assert (await post(bridge, reply())).code == 200
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1, timeout=20)
    assert time.monotonic() - started > 1.0  # GHL was down longer than report_deadline
    assert len(bridge.ghl.calls_to("POST", "/conversations/messages/inbound")) == 3
    await wait_for(lambda: inbound_metric(bridge, "delivered") == 1)
    await wait_for(lambda: not bridge.daemon.outbox.records)


@pytest.mark.gen_test(timeout=30)
async def test_inbound_2xx_with_empty_body_is_retried_and_counted_failed(bridge, caplog):
    await bridge.start()
    await bridge.install("loc1")
    bridge.ghl.fail_next("inbound", 201, body="")
    assert (await post(bridge, reply())).code == 200
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1, timeout=20)
    assert len(bridge.ghl.calls_to("POST", "/conversations/messages/inbound")) == 2
    await wait_for(lambda: inbound_metric(bridge, "delivered") == 1)
    assert inbound_metric(bridge, "failed", stage="attempt") == 1
    assert inbound_metric(bridge, "failed") == 0
    (warning,) = [r for r in caplog.records if "without messageId" in r.getMessage()]
    assert "CASTIN1" in warning.getMessage()
    assert "conversation_provider_id" in warning.getMessage()


@pytest.mark.gen_test(timeout=30)
async def test_custom_provider_id_is_sent_so_ghl_keeps_the_message(bridge):
    bridge.ghl.custom_provider_id = "prov-custom"
    await bridge.start({"ghl": {"conversation_provider_id": "prov-custom"}})
    await bridge.install("loc1")
    assert (await post(bridge, reply())).code == 200
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    assert bridge.ghl.inbound_messages[0]["conversationProviderId"] == "prov-custom"
    assert bridge.ghl.dropped_inbound == 0


@pytest.mark.gen_test(timeout=30)
async def test_permanent_4xx_ends_the_reply_with_ghls_reason(bridge, caplog):
    await bridge.start()
    await bridge.install("loc1")
    bridge.ghl.fail_next("inbound", 400, body={"statusCode": 400, "message": "Message too long"})
    assert (await post(bridge, reply())).code == 200
    await wait_for(lambda: inbound_metric(bridge, "failed") == 1)
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert bridge.ghl.inbound_messages == []
    assert any("Message too long" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=30)
async def test_unrouted_reply_expires_after_inbound_max_age(bridge):
    await bridge.start({"delivery": {"inbound_max_age": "1s"}})
    await bridge.install("locA")
    await bridge.install("locB")
    assert (await post(bridge, reply("LOST", to="09175550000"))).code == 200
    await wait_for(lambda: bridge.daemon.outbox.records and bridge.daemon.outbox.running == 0)
    accepted = bridge.daemon.outbox.records["in:LOST"]["accepted_at"]
    await wait_for(lambda: time.time() > accepted + 1.1)  # the reply is past its age
    await bridge.install("locC")  # routes waiting replies again
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert inbound_metric(bridge, "expired") == 1
    assert bridge.ghl.inbound_messages == []


# -- §6 config -----------------------------------------------------------------------------------


def test_app_id_defaults_to_the_client_id_before_the_first_dash(config_dir):
    config = config_dir.load({"ghl": {"client_id": "65f1a2b3c4-lmn0pqrs"}})
    assert config.ghl.app_id == "65f1a2b3c4"
    assert config_dir.load({"ghl": {"app_id": "override"}}).ghl.app_id == "override"


@pytest.mark.parametrize(
    "extra",
    [
        {"cast": {"sender_id": "TWELVE_CHARS"}},
        {"cast": {"locations": {"loc1": {"sender_id": "ACME-COMPANY-PH"}}}},
    ],
)
def test_sender_id_longer_than_11_characters_is_a_config_error(config_dir, extra):
    with pytest.raises(ConfigError) as raised:
        config_dir.load(extra)
    (problem,) = raised.value.problems
    assert "sender_id" in problem and "11" in problem


def test_numeric_sender_id_may_be_a_full_phone_number(config_dir):
    assert config_dir.load({"cast": {"sender_id": "+639171234567"}}).cast.sender_id

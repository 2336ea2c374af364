"""GHL's contract as its docs and SDK show it (issue 8 §3, §4, §6): signatures where the current
scheme decides, and config points (app id, sender ID length)."""

from __future__ import annotations

import json

import pytest
from test_oauth import app_event, post_app_webhook

from castghld.config import ConfigError

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

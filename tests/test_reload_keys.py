"""Every config key is either applied by a SIGHUP reload or listed as restart-only.

Each key in `RELOADED` names the test below that changes it on a running daemon and checks that
the daemon then behaves per the new value (not that an attribute changed); `RESTART_KEYS`
(castghld/reload.py) lists the others, logged as taking effect at the next restart.
`test_every_config_key_is_reloaded_or_restart_only` walks the config dataclasses, so a key added
later fails it until it is put in one of the two lists.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import typing
from urllib.parse import parse_qs, urlsplit

import prometheus_client
import prometheus_client.parser
import pytest
from tornado.httpclient import AsyncHTTPClient

from castghld import config as config_module
from castghld.config import Config
from castghld.config_values import Secret
from castghld.fakes import wait_for
from castghld.reload import RESTART_KEYS
from tests.conftest import merge
from tests.test_agency import agency_installed
from tests.test_oauth import app_event

SEND = "/api/v1/sms/send"
US_MOBILE = "+14155552671"

# key -> the test of this module (or another, as "file::test") that proves a reload applies it.
RELOADED = {
    "server.public_url": "test_reload_applies_oauth_install_link_keys",
    "server.shutdown_timeout": "test_reload_applies_shutdown_timeout",
    "ghl.client_id": "test_reload_applies_oauth_install_link_keys",
    "ghl.client_secret": "test_reload_applies_client_secret_to_token_calls",
    "ghl.auth_base": "test_reload_applies_oauth_install_link_keys",
    "ghl.webhook_public_keys": "test_reload_applies_webhook_keys_and_legacy_rsa",
    "ghl.conversation_provider_id": "test_reload_applies_conversation_provider_id",
    "ghl.app_id": "test_reload_applies_app_id",
    "ghl.accept_legacy_rsa": "test_reload_applies_webhook_keys_and_legacy_rsa",
    "cast.api_key": "test_reload_applies_cast_key_and_sender_id",
    "cast.sender_id": "test_reload_applies_cast_key_and_sender_id",
    "cast.inbound_secret": "test_reload.py::test_reload_rotates_inbound_secret_without_restart",
    "cast.locations.*.api_key": "test_reload_applies_location_overrides",
    "cast.locations.*.sender_id": "test_reload_applies_location_overrides",
    "cast.locations.*.inbound_numbers": "test_reload_applies_location_overrides",
    "cast.account": "test_reload_applies_account_names",
    "cast.locations.*.account": "test_reload_applies_account_names",
    "cast.balance_interval": (
        "test_credits.py::test_a_reload_applies_a_new_balance_interval_at_once"
    ),
    "tokens.refresh_interval": "test_reload_applies_refresh_interval_to_the_waiting_sweep",
    "tokens.refresh_margin": "test_reload_applies_refresh_margin",
    "tokens.reconcile_interval": "test_reload_applies_reconcile_interval_to_the_waiting_loop",
    "delivery.send_deadline": "test_reload_applies_send_deadline",
    "delivery.report_deadline": "test_reload_applies_status_polls_and_report_deadline",
    "delivery.status_polls": "test_reload_applies_status_polls_and_report_deadline",
    "delivery.allowed_regions": "test_reload_narrowing_allowed_regions_stops_texting_there",
    "delivery.inbound_max_age": "test_reload_applies_inbound_max_age",
    "delivery.request_timeout": "test_reload_applies_request_timeout_to_upstream_calls",
    "logging.level": "test_reload_applies_logging_level_and_format",
    "logging.format": "test_reload_applies_logging_level_and_format",
}


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the config dataclass `cls`, by its path in the YAML file (`*` for the id of
    a per-location entry)."""
    hints = typing.get_type_hints(cls, vars(config_module))
    keys = []
    for f in dataclasses.fields(cls):
        if f.name in ("path", "unresolved"):  # where it was read from, what it lacks: not keys
            continue
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and hint is not Secret:
            keys += config_keys(hint, key + ".")
        elif typing.get_origin(hint) in (typing.Mapping, dict) or "Mapping" in str(hint):
            value_type = typing.get_args(hint)[1]
            keys += config_keys(value_type, key + ".*.")
        else:
            keys.append(key)
    return keys


def test_every_config_key_is_reloaded_or_restart_only():
    import sys

    keys = config_keys(Config)
    assert "cast.locations.*.inbound_numbers" in keys and "delivery.request_timeout" in keys
    for key in keys:
        assert (key in RESTART_KEYS) != (key in RELOADED), f"{key}: in neither list, or in both"
    assert set(RELOADED) | set(RESTART_KEYS) == set(keys)
    module = sys.modules[__name__]
    for key, test in RELOADED.items():
        if "::" in test:
            path, name = test.split("::")
            other = __import__(f"tests.{path.removesuffix('.py')}", fromlist=[name])
            assert callable(getattr(other, name, None)), f"{key}: {test} does not exist"
        else:
            assert callable(getattr(module, test, None)), f"{key}: {test} does not exist"


# -- helpers -----------------------------------------------------------------------------------


class Running:
    """The bridge's daemon started with `base`; `reload(extra)` rewrites the config file as
    `base` + `extra` and sends the daemon its SIGHUP reload."""

    def __init__(self, bridge, base: dict):
        self.bridge = bridge
        self.base = base

    async def start(self):
        await self.bridge.start(self.base)
        return self

    def reload(self, extra: dict) -> None:
        self.bridge.config_dir.write(merge(merge(self.bridge.extra, self.base), extra))
        assert self.bridge.daemon.reload() is True


def statuses(ghl, message_id: str) -> list[str]:
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


def refreshes(ghl) -> int:
    return sum(
        1
        for call in ghl.calls_to("POST", "/oauth/token")
        if call.form.get("grant_type") == "refresh_token"
    )


# -- the keys issue 16 found neither reloaded nor restart-only ----------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_reload_narrowing_allowed_regions_stops_texting_there(bridge):
    running = await Running(bridge, {"delivery": {"allowed_regions": ["PH", "US"]}}).start()
    await bridge.install("loc1")
    running.reload({"delivery": {"allowed_regions": ["PH"]}})
    await bridge.post_message(messageId="m-us", phone=US_MOBILE)
    await wait_for(lambda: "failed" in statuses(bridge.ghl, "m-us"))
    assert bridge.cast.calls_to("POST", SEND) == []  # refused here, never handed to Cast
    await bridge.post_message(messageId="m-ph", phone="+639171234567")
    await wait_for(lambda: "delivered" in statuses(bridge.ghl, "m-ph"))


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_refresh_interval_to_the_waiting_sweep(bridge):
    tokens = {"refresh_interval": "1h", "refresh_margin": "7d"}  # every sweep refreshes
    running = await Running(bridge, {"tokens": tokens}).start()
    await bridge.install("loc1")  # after the startup sweep: the next one is an hour away
    assert refreshes(bridge.ghl) == 0
    running.reload({"tokens": {"refresh_interval": "1s"}})
    await wait_for(lambda: refreshes(bridge.ghl) >= 2, timeout=10)


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_refresh_margin(bridge):
    running = await Running(bridge, {"tokens": {"refresh_interval": "1s"}}).start()
    await bridge.install("loc1")  # a 24 h token is not due within the default 6 h margin
    assert refreshes(bridge.ghl) == 0
    running.reload({"tokens": {"refresh_margin": "7d"}})
    await wait_for(lambda: refreshes(bridge.ghl) >= 1, timeout=10)


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_reconcile_interval_to_the_waiting_loop(bridge):
    base = {"tokens": {"reconcile_interval": "1h"}}
    await agency_installed(bridge, ["locA"], base)
    running = Running(bridge, base)
    listed = len(bridge.ghl.calls_to("GET", "/oauth/installedLocations"))
    running.reload({"tokens": {"reconcile_interval": "1s"}})
    await wait_for(
        lambda: len(bridge.ghl.calls_to("GET", "/oauth/installedLocations")) >= listed + 2,
        timeout=10,
    )


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_request_timeout_to_upstream_calls(bridge):
    running = await Running(bridge, {"delivery": {"request_timeout": "10s"}}).start()
    await bridge.install("loc1")
    running.reload({"delivery": {"request_timeout": "0.5s"}})
    bridge.cast.hang("send")
    await bridge.post_message(messageId="m-slow")
    # Cast does not answer: the send is given up after 0.5 s and retried (1 s backoff at most).
    await wait_for(lambda: len(bridge.cast.calls_to("POST", SEND)) >= 2, timeout=6)
    bridge.cast.release("send")
    await wait_for(lambda: "delivered" in statuses(bridge.ghl, "m-slow"))


# -- the keys read at each use -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_logging_level_and_format(bridge):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        running = await Running(bridge, {"logging": {"level": "info", "format": "text"}}).start()
        running.reload({"logging": {"level": "warning", "format": "json"}})
        assert logging.getLogger("castghld").getEffectiveLevel() == logging.WARNING
        [handler] = root.handlers
        record = logging.LogRecord("castghld", logging.WARNING, __file__, 1, "probe", (), None)
        assert json.loads(handler.format(record).lstrip("<01234567>"))["msg"] == "probe"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_oauth_install_link_keys(bridge):
    running = await Running(bridge, {}).start()
    running.reload(
        {
            "server": {"public_url": "https://new.example.ph"},
            "ghl": {
                "client_id": "client-2",
                "auth_base": "https://marketplace.leadconnectorhq.com",
            },
        }
    )
    response = await fetch(bridge.daemon.url + "/oauth/install")
    assert response.code == 302
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}" == "https://marketplace.leadconnectorhq.com"
    query = parse_qs(location.query)
    assert query["client_id"] == ["client-2"]
    assert query["redirect_uri"] == ["https://new.example.ph/oauth/callback"]


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_client_secret_to_token_calls(bridge):
    running = await Running(bridge, {}).start()
    bridge.ghl.client_secret = "secret-2"  # GHL now accepts only the rotated secret
    running.reload({"ghl": {"client_secret": "secret-2"}})
    await bridge.install("loc1")  # the fixture asserts that no token call was refused
    assert bridge.daemon.installations.get("loc1") is not None


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_webhook_keys_and_legacy_rsa(bridge):
    running = await Running(bridge, {"ghl": {"accept_legacy_rsa": True}}).start()
    url = bridge.daemon.url + "/api/ghl/v1/webhook/app"
    event = {"type": "ContactCreate", "appId": "test"}
    assert (await bridge.ghl.post_webhook(url, event, "rsa")).code == 200
    running.reload({"ghl": {"accept_legacy_rsa": False}})
    assert (await bridge.ghl.post_webhook(url, event, "rsa")).code == 401
    assert (await bridge.ghl.post_webhook(url, event)).code == 200
    running.reload({"ghl": {"webhook_public_keys": []}})  # the fake's keys are no longer trusted
    assert (await bridge.ghl.post_webhook(url, event)).code == 401


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_conversation_provider_id(bridge):
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    running.reload({"ghl": {"conversation_provider_id": "prov-2"}})
    await post_reply(bridge, "CASTIN-PROV", "09170000001")
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    assert bridge.ghl.inbound_messages[0]["conversationProviderId"] == "prov-2"


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_app_id(bridge):
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    running.reload({"ghl": {"app_id": "app-2"}})
    url = bridge.daemon.url + "/api/ghl/v1/webhook/app"
    old = app_event("UNINSTALL", "loc1", appId="test")
    assert (await bridge.ghl.post_webhook(url, old)).code == 200
    assert bridge.daemon.installations.get("loc1") is not None  # another app's now: ignored
    new = app_event("UNINSTALL", "loc1", appId="app-2")
    assert (await bridge.ghl.post_webhook(url, new)).code == 200
    await wait_for(lambda: bridge.daemon.installations.get("loc1") is None)


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_cast_key_and_sender_id(bridge):
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    bridge.cast.api_keys["cast_test_key_2"] = "acct"
    running.reload({"cast": {"api_key": "cast_test_key_2", "sender_id": "NEWSENDER"}})
    await bridge.post_message(messageId="m-key-2")
    await wait_for(lambda: "delivered" in statuses(bridge.ghl, "m-key-2"))
    [send] = bridge.cast.calls_to("POST", SEND)
    assert send.headers["X-API-Key"] == "cast_test_key_2"
    assert json.loads(send.body)["sender_id"] == "NEWSENDER"


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_location_overrides(bridge):
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    await bridge.install("loc2")
    bridge.cast.api_keys["cast_test_loc1"] = "acct-loc1"
    override = {
        "api_key": "cast_test_loc1",
        "sender_id": "LOC1",
        "inbound_numbers": ["09170000009"],
    }
    running.reload({"cast": {"locations": {"loc1": override}}})
    await bridge.post_message(messageId="m-loc1")
    await wait_for(lambda: "delivered" in statuses(bridge.ghl, "m-loc1"))
    [send] = bridge.cast.calls_to("POST", SEND)
    assert send.headers["X-API-Key"] == "cast_test_loc1"
    assert json.loads(send.body)["sender_id"] == "LOC1"
    # Two locations installed: only the new mapping routes a reply to this number.
    await post_reply(bridge, "CASTIN-LOC1", "09170000009")
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    assert bridge.ghl.inbound_messages[0]["locationId"] == "loc1"


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_send_deadline(bridge):
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    running.reload({"delivery": {"send_deadline": "2s"}})
    bridge.cast.fail_next("send", 503, headers={"Retry-After": "30"})
    await bridge.post_message(messageId="m-late")
    # Its retry would come 30 s later, after the 2 s deadline: failed now, not retried.
    await wait_for(lambda: "failed" in statuses(bridge.ghl, "m-late"), timeout=10)
    assert len(bridge.cast.calls_to("POST", SEND)) == 1


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_status_polls_and_report_deadline(bridge):
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    bridge.cast.set_delivery("09171234567", "sent")  # no receipt ever arrives
    polls = [0.05, 0.1, 0.15, 0.2, 0.25]
    running.reload({"delivery": {"status_polls": polls}})
    await bridge.post_message(messageId="m-polls", phone="09171234567")
    await wait_for(lambda: not bridge.daemon.outbox.records, timeout=15)
    assert len(bridge.cast.calls_to("GET", "/api/v1/sms/status")) == len(polls)
    # GHL refuses every status report now: it is given up at the new 1 s report deadline.
    bridge.ghl.fail_next("status", 500, times=1000)
    running.reload({"delivery": {"report_deadline": "1s"}})
    await bridge.post_message(messageId="m-unreported", phone="09171234567")
    await wait_for(lambda: reports_given_up(bridge.daemon) >= 1, timeout=15)


@pytest.mark.gen_test(timeout=30)
async def test_reload_applies_inbound_max_age(bridge):
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    await bridge.install("loc2")
    await post_reply(bridge, "CASTIN-OLD", "09170000003")  # unroutable: two installed, no map
    accepted = time.time()
    running.reload({"delivery": {"inbound_max_age": "1s"}})
    await wait_for(lambda: time.time() > accepted + 1.5)  # the reply outgrows the new age
    await bridge.install("loc3")  # an install routes waiting replies again
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert bridge.ghl.inbound_messages == []


@pytest.mark.gen_test(timeout=40)
async def test_reload_applies_shutdown_timeout(bridge, caplog):
    running = await Running(bridge, {"server": {"shutdown_timeout": "20s"}}).start()
    running.reload({"server": {"shutdown_timeout": "8s"}})  # 1 s for requests in flight
    bridge.ghl.hang("token")
    bridge.ghl.add_auth_code("code-hung", location_id="loc9")
    callback = asyncio.ensure_future(fetch(bridge.daemon.url + "/oauth/callback?code=code-hung"))
    await wait_for(lambda: bridge.ghl.hung("token") == 1)
    with caplog.at_level(logging.WARNING, logger="castghld"):
        stopping = asyncio.ensure_future(bridge.stop())
        # With the 20 s it started with, requests would get 13 s.
        await wait_for(lambda: "shutdown bound reached" in caplog.text, timeout=5)
    bridge.ghl.release("token")
    await stopping
    await asyncio.gather(callback, return_exceptions=True)  # cut by the stop


async def fetch(url: str, **kwargs):
    return await AsyncHTTPClient().fetch(url, raise_error=False, follow_redirects=False, **kwargs)


async def post_reply(bridge, message_id: str, to: str):
    payload = {
        "message_id": message_id,
        "from": "09181234567",
        "to": to,
        "message": "a reply",
        "received_at": "2026-11-26T09:00:00Z",
    }
    url = bridge.daemon.url + "/api/cast/v1/webhook/inbound"
    response = await bridge.cast.post_inbound(url, "inbound-secret", payload)
    assert response.code == 200


def reports_given_up(daemon) -> float:
    """castghld_ghl_status_reports_total{status="report_failed"}."""
    for family in prometheus_client.parser.text_string_to_metric_families(
        prometheus_client.generate_latest(daemon.metrics.registry).decode()
    ):
        for sample in family.samples:
            if sample.name == "castghld_ghl_status_reports_total" and sample.labels == {
                "status": "report_failed"
            }:
                return sample.value
    raise AssertionError("no castghld_ghl_status_reports_total{status=report_failed}")


@pytest.mark.gen_test(timeout=60)
async def test_reload_applies_account_names(bridge):
    """A name given by reload is the account's name from the next send on: its pause says so."""
    running = await Running(bridge, {}).start()
    await bridge.install("loc1")
    await bridge.install("loc2")
    bridge.cast.api_keys["cast_test_loc2"] = "acct-two"
    bridge.cast.set_credits("acct", 0)
    bridge.cast.set_credits("acct-two", 0)
    locations = {"loc2": {"api_key": "cast_test_loc2", "account": "second"}}
    running.reload({"cast": {"account": "main", "locations": locations}})
    assert bridge.daemon.cast.account_for("loc1").name == "main"
    await bridge.post_message(messageId="m-one", locationId="loc1")
    await bridge.post_message(messageId="m-two", locationId="loc2")
    await wait_for(lambda: set(bridge.daemon.outbound.accounts.paused) == {"main", "second"})
    bridge.cast.top_up("acct", 5)
    bridge.cast.top_up("acct-two", 5)
    await wait_for(lambda: "delivered" in statuses(bridge.ghl, "m-one"), timeout=20)
    await wait_for(lambda: "delivered" in statuses(bridge.ghl, "m-two"), timeout=20)

"""SIGHUP reload: a valid new config is taken without a restart, a bad one is rejected and the
running one kept; keys a running process cannot change are reported and keep their value."""

from __future__ import annotations

import logging
import os
import signal
import urllib.request

import pytest
import yaml
from tornado.httpclient import AsyncHTTPClient

from castghld.reload import config_changes, effective_config
from tests.conftest import BASE_CONFIG, merge
from tests.test_serve import start_serve, wait_for_port


async def post_inbound(daemon, secret: str):
    return await AsyncHTTPClient().fetch(
        daemon.url + "/api/cast/v1/webhook/inbound",
        method="POST",
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        body='{"message_id": "CASTIN1", "from": "09171234567", "to": "CAST", "message": "hi"}',
        raise_error=False,
    )


@pytest.fixture
def daemon(daemons):
    return daemons.start()


@pytest.mark.gen_test(timeout=20)
async def test_reload_rotates_inbound_secret_without_restart(daemon, config_dir, caplog):
    components = list(daemon.components)
    config_dir.write({"cast": {"inbound_secret": "rotated-secret"}})
    with caplog.at_level(logging.INFO, logger="castghld"):
        assert daemon.reload() is True
    assert daemon.components == components
    assert (await post_inbound(daemon, "inbound-secret")).code == 401
    assert (await post_inbound(daemon, "rotated-secret")).code != 401
    assert "cast.inbound_secret (secret) changed" in caplog.text
    assert "rotated-secret" not in caplog.text


@pytest.mark.gen_test(timeout=20)
async def test_reload_reaches_every_component_holding_the_config(daemon, config_dir):
    config_dir.write({"ghl": {"conversation_provider_id": "prov-2"}})
    assert daemon.reload()
    holders = [daemon, daemon.ghl, daemon.cast, daemon.installations, daemon.inbound]
    holders += list(daemon.outbox.pipelines.values())
    for holder in holders:
        assert holder.config is daemon.config, type(holder).__name__
    assert daemon.inbound.config.ghl.conversation_provider_id == "prov-2"


@pytest.mark.gen_test(timeout=20)
async def test_bad_config_is_rejected_with_reasons_and_old_kept(daemon, config_dir, caplog):
    running = daemon.config
    config_dir.write({"cast": {"inbound_secret": "new", "messages_per_secnd": 5}})
    with caplog.at_level(logging.INFO, logger="castghld"):
        assert daemon.reload() is False
    assert daemon.config is running
    assert "reload rejected" in caplog.text
    assert "messages_per_secnd" in caplog.text
    assert (await post_inbound(daemon, "inbound-secret")).code != 401


@pytest.mark.gen_test(timeout=20)
async def test_restart_only_keys_are_reported_and_keep_running_value(daemon, config_dir, caplog):
    config_dir.write({"server": {"port": 9999}, "cast": {"sender_id": "NEWSENDER"}})
    with caplog.at_level(logging.INFO, logger="castghld"):
        assert daemon.reload()
    assert daemon.config.server.port == 0
    assert daemon.config.cast.sender_id == "NEWSENDER"
    assert "server.port: 0 -> 9999 (takes effect at the next restart)" in caplog.text
    assert "cast.sender_id: '' -> 'NEWSENDER'" in caplog.text


def test_changes_name_keys_and_hide_secrets(config_dir):
    old = config_dir.load()
    new = config_dir.load({"ghl": {"client_secret": "s2"}, "cast": {"locations": {"L1": {}}}})
    described = [c.describe() for c in config_changes(old, new)]
    assert described == [
        "ghl.client_secret (secret) changed",
        "cast.locations.L1: 'absent' -> 'added'",
    ]
    assert effective_config(old, new).ghl.client_secret.value == "s2"


def test_sighup_to_serve_reloads_and_keeps_serving(config_dir):
    path = config_dir.write()
    proc = start_serve(path)
    try:
        port = wait_for_port(proc)
        with open(path, "w") as f:
            yaml.safe_dump(merge(BASE_CONFIG, {"cast": {"sender_id": "NEWSENDER"}}), f)
        proc.send_signal(signal.SIGHUP)
        _read_until(proc, "config reloaded")
        with open(path, "w") as f:
            f.write("server: [not, a, mapping\n")
        proc.send_signal(signal.SIGHUP)
        _read_until(proc, "reload rejected")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _read_until(proc, needle: str) -> str:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not logged; got:\n{''.join(seen)}")


def test_unit_reloads_with_sighup():
    unit = os.path.join(os.path.dirname(__file__), "..", "systemd", "castghld.service")
    with open(unit) as f:
        text = f.read()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text

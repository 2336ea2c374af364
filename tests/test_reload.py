"""SIGHUP reload: a valid new config is taken without a restart, a bad one is rejected and the
running one kept; keys a running process cannot change are reported and keep their value."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
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
    return _lines_until(proc, needle)[-1]


def _lines_until(proc, needle: str) -> list[str]:
    """The lines logged up to and including the first that holds `needle`."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not logged; got:\n{''.join(seen)}")


def test_unit_reloads_with_sighup():
    unit = os.path.join(os.path.dirname(__file__), "..", "systemd", "castghld.service")
    with open(unit) as f:
        text = f.read()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text


def test_unit_checks_the_config_before_it_signals_a_reload():
    """`systemctl reload` fails (exit 2) on a config the daemon would reject: ExecReload lines run
    in order and the first that fails stops the reload before SIGHUP is sent."""
    unit = os.path.join(os.path.dirname(__file__), "..", "systemd", "castghld.service")
    with open(unit) as f:
        reloads = [line for line in f.read().splitlines() if line.startswith("ExecReload=")]
    assert reloads == [
        "ExecReload=/opt/castghld/bin/castghld --config /etc/castghld/castghld.yaml check-config",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ]


def test_sighup_speaks_systemds_reload_protocol_and_shows_a_rejection(config_dir, tmp_path):
    """RELOADING=1 (with MONOTONIC_USEC) then READY=1 with a STATUS= that says whether the reload
    was taken; /metrics says the same in castghld_config_last_reload_successful."""
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    path = config_dir.write()
    proc = start_serve(path, notify_path)
    try:
        port = wait_for_port(proc)
        assert notify.recv(4096) == b"READY=1"
        proc.send_signal(signal.SIGHUP)
        reloading = notify.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1"
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
        assert notify.recv(4096) == b"READY=1\nSTATUS=config reloaded"
        assert _gauge(port, "castghld_config_last_reload_successful") == 1
        applied_at = _gauge(port, "castghld_config_last_reload_success_timestamp_seconds")
        with open(path, "w") as f:
            f.write("server: [not, a, mapping\n")
        proc.send_signal(signal.SIGHUP)
        assert notify.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        ready = notify.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=reload rejected"), ready
        assert _gauge(port, "castghld_config_last_reload_successful") == 0
        assert _gauge(port, "castghld_config_last_reload_success_timestamp_seconds") == applied_at
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
        notify.close()


def _gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def test_reload_says_a_systemd_credential_copy_is_not_known_to_be_current(config_dir, tmp_path):
    """`LoadCredential=` copies are made at start: an unchanged copy after a reload says nothing
    about the source file the operator edited, and the log must not claim the key was re-read."""
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    key_file = credentials / "cast_api_key"
    key_file.write_text("cast_test_key\n")
    os.chmod(key_file, 0o600)
    cast = {"api_key": None, "api_key_file": str(key_file), "inbound_secret": "inbound-secret"}
    path = config_dir.write({"cast": cast})
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "castghld", "--config", path, "serve"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_port(proc)
        proc.send_signal(signal.SIGHUP)
        *before, done = _lines_until(proc, "config reloaded")
        (warning,) = [line for line in before if "$CREDENTIALS_DIRECTORY" in line]
        assert "cast.api_key_file unchanged" in warning and "systemctl restart" in warning
        assert "re-read" not in done and "not known to be current" in done
        key_file.write_text("cast_test_other\n")
        proc.send_signal(signal.SIGHUP)
        *before, done = _lines_until(proc, "config reloaded")
        assert "1 change(s)" in done and "not known to be current" not in done
        assert not any("$CREDENTIALS_DIRECTORY" in line for line in before)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.gen_test(timeout=30)
async def test_sighup_during_start_does_not_tell_systemd_ready_early(bridge, tmp_path, monkeypatch):
    """A SIGHUP while the daemon starts (re-encrypting the state under a new key may take a
    while) must not send READY=1 before it serves: systemd would take the start as done. The
    reload runs once it serves, inside the reload protocol."""
    import tornado.testing

    from castghld.app import Daemon

    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path)
    daemon = Daemon(bridge.config_dir.load(bridge.extra))
    bridge.runner.running.append(daemon)
    sock, _ = tornado.testing.bind_unused_port()
    daemon.reload_from_signal()  # the signal handler is installed before the start
    await daemon.start([sock])
    received = []
    try:
        while True:
            received.append(notify.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        notify.close()
    assert received[0] == "READY=1", received
    assert [m.split("\n")[0] for m in received[1:]] == ["RELOADING=1", "READY=1"]
    assert received[2] == "READY=1\nSTATUS=config reloaded"

"""`check-config` predicts `serve`: where serve would fail, check-config fails first (same exit
class); risky but working settings are warnings."""

from __future__ import annotations

import os
import socket

import pytest

from tests.test_cli import run_cli
from tests.test_serve import start_serve, wait_for_port


def check_and_serve(path: str):
    checked = run_cli("--config", path, "check-config")
    proc = start_serve(path)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return checked, proc.returncode, err


def test_port_in_use_fails_check_config_like_serve(config_dir):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        path = config_dir.write({"server": {"port": port}})
        checked, serve_code, _ = check_and_serve(path)
    finally:
        busy.close()
    assert serve_code == 75
    assert checked.returncode == 75
    assert f"cannot listen on 127.0.0.1:{port}" in checked.stderr
    assert "server.host/server.port" in checked.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0500 directory anyway")
def test_unwritable_state_dir_fails_check_config_like_serve(config_dir):
    path = config_dir.write()
    os.chmod(config_dir.state_dir, 0o500)
    try:
        checked, serve_code, _ = check_and_serve(path)
    finally:
        os.chmod(config_dir.state_dir, 0o700)
    assert serve_code != 0
    assert checked.returncode != 0 and "state.dir" in checked.stderr


def test_unknown_region_code_is_a_config_error(config_dir):
    path = config_dir.write({"delivery": {"allowed_regions": ["PH", "XX"]}})
    checked = run_cli("--config", path, "check-config")
    assert checked.returncode == 2
    assert "delivery.allowed_regions" in checked.stderr and "XX" in checked.stderr


def test_risky_settings_are_warnings(config_dir):
    os.chmod(config_dir.state_dir, 0o755)  # noqa: S103 (the warning under test)
    path = config_dir.write(
        {"server": {"host": "0.0.0.0", "xheaders": True, "public_url": "http://ghl.example.ph"}}  # noqa: S104
    )
    checked = run_cli("--config", path, "check-config")
    assert checked.returncode == 0, checked.stderr
    assert "server.public_url is http://" in checked.stdout
    assert "server.host 0.0.0.0 with server.xheaders: true" in checked.stdout
    assert "is mode 0755" in checked.stdout
    assert checked.stdout.strip().endswith("ok")


def test_check_config_beside_a_running_daemon_says_so(config_dir):
    path = config_dir.write()
    proc = start_serve(path)
    try:
        wait_for_port(proc)
        checked = run_cli("--config", path, "check-config")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert checked.returncode == 0, checked.stderr
    assert "a castghld daemon is running here; bind and lock not tested" in checked.stdout

"""`castghld serve` as systemd runs it: READY=1, /healthz, SIGTERM -> STOPPING=1 and exit 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def start_serve(config_path, notify_path=None):
    env = {**os.environ}
    if notify_path:
        env["NOTIFY_SOCKET"] = notify_path
    return subprocess.Popen(
        [sys.executable, "-m", "castghld", "--config", config_path, "serve"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_port(proc, timeout=20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if match:
            return int(match.group(1))
    raise AssertionError("daemon did not report its port")


def test_sigterm_exits_zero_with_systemd_notifications(config_dir, tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    proc = start_serve(config_dir.write(), notify_path)
    try:
        port = wait_for_port(proc)
        assert notify.recv(4096) == b"READY=1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
        notify.close()


def test_serve_with_bad_state_key_exits_2(config_dir):
    os.chmod(config_dir.key_path, 0o644)
    proc = start_serve(config_dir.write())
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "accessible by group/others" in err
    assert "Traceback" not in err

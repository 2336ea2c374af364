"""`castghld demo`: the round trip on loopback, no account, exit 0, every hop named, cleaned up."""

from __future__ import annotations

import glob
import os
import subprocess
import sys


def test_demo_exits_zero_naming_each_hop(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "castghld", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for hop in (
        "GHL -> castghld    OAuth callback: HTTP 200",
        "GHL -> castghld    signed outbound webhook: HTTP 200",
        "castghld -> Cast   POST /api/v1/sms/send",
        "castghld -> GHL    PUT /conversations/messages/demo-msg-1/status",
        '{"status": "delivered"}',
        "Cast -> castghld   inbound reply: HTTP 200",
        "castghld -> GHL    POST /conversations/messages/inbound",
        "round trip complete",
    ):
        assert hop in out
    assert "Traceback" not in result.stderr
    assert glob.glob(str(tmp_path / "castghld-demo-*")) == []


def test_demo_shows_the_cast_balance_before_and_after_the_sms(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "castghld", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "castghld -> Cast   GET /api/v1/account/balance before the SMS: 1000 credits" in (
        result.stdout
    )
    assert "GET /api/v1/account/balance after it (1 part charged): 999 credits" in result.stdout

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
    # A clean run warns of nothing: a warning line would read as a failure to a new user.
    assert "WARNING" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    assert glob.glob(str(tmp_path / "castghld-demo-*")) == []


def test_demo_shows_the_cast_balance_the_send_spent(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "castghld", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "castghld -> Cast   GET /api/v1/account/balance (acct-" in result.stdout
    assert '{"credits": 99, "currency": "PHP"}' in result.stdout
    assert "cast_test_demo" not in result.stdout
    before = result.stdout.index('{"credits": 100, "currency": "PHP"}')
    assert (
        before
        < result.stdout.index("POST /api/v1/sms/send")
        < result.stdout.index('{"credits": 99, "currency": "PHP"}')
    )

"""A full disk through the real filesystem: RLIMIT_FSIZE on the daemon process makes every write
fail (EFBIG) as ENOSPC does, and lifting it is space coming back, without a restart.

Guarantees probed: a webhook or an install that cannot be stored is answered 503 (JSON), nothing
answered 200 is lost, nothing refused is half-kept (a refused install is not installed once space
returns), the previous state file stays loadable, and the daemon recovers by itself.
"""

from __future__ import annotations

import json
import resource

import pytest
from daemon_process import ServeProcess
from tornado.httpclient import AsyncHTTPClient
from traffic import assert_private, final_statuses

from castghld.fakes import wait_for

FULL = 1  # bytes: every write past the first byte of any file fails


def set_file_limit(serve: ServeProcess, limit: int) -> None:
    """The soft limit (the one writes meet); the hard one stays unlimited so it can be lifted."""
    resource.prlimit(serve.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


@pytest.mark.gen_test(timeout=120)
async def test_full_disk_refuses_installs_and_messages_then_recovers_live(
    config_dir, fake_ghl, fake_cast
):
    serve = ServeProcess(config_dir, fake_ghl, fake_cast)
    try:
        await serve.start()
        await serve.install("loc1")
        set_file_limit(serve, FULL)
        fake_ghl.add_auth_code("code-loc2", location_id="loc2")
        answer = await AsyncHTTPClient().fetch(
            f"{serve.url}/oauth/callback?code=code-loc2", raise_error=False
        )
        assert answer.code == 503, answer.body
        codes = {}
        for n in range(5):
            response = await serve.post_message(f"m{n}")
            codes[f"m{n}"] = response.code
            if response.code != 200:
                assert json.loads(response.body)["error"] == "store_failed"
        assert set(codes.values()) == {503}, codes
        assert fake_cast.sent == []
        assert (await AsyncHTTPClient().fetch(serve.url + "/healthz", raise_error=False)).code
        set_file_limit(serve, resource.RLIM_INFINITY)  # space comes back
        for message_id in codes:  # GHL resends what was refused
            assert (await serve.post_message(message_id)).code == 200
        await wait_for(
            lambda: all(s[-1:] == ["delivered"] for s in final_statuses(fake_ghl, codes).values()),
            timeout=30,
        )
        assert sorted(s["idempotency_key"] for s in fake_cast.sent) == sorted(codes)
        assert await serve.terminate() == 0
    finally:
        serve.close()
    installs = serve.cli("installs")
    assert installs.returncode == 0, installs.stderr
    assert "loc1" in installs.stdout and "loc2" not in installs.stdout  # refused, not half-kept
    assert serve.cli("check-config").returncode == 0
    assert_private(serve.state_dir)
    assert fake_ghl.violations == [] and fake_cast.violations == []


@pytest.mark.gen_test(timeout=120)
async def test_disk_full_mid_delivery_loses_no_progress_and_sends_once(
    config_dir, fake_ghl, fake_cast
):
    """Messages accepted, then the disk fills while sends are in flight: their outcome cannot be
    recorded (and no new send may start unrecorded); once space returns every message ends
    delivered, each sent once (a resend after the lost record carries the same key)."""
    serve = ServeProcess(config_dir, fake_ghl, fake_cast)
    try:
        await serve.start()
        await serve.install("loc1")
        fake_cast.hang("send")
        ids = [f"d{n}" for n in range(10)]
        for message_id in ids:
            assert (await serve.post_message(message_id)).code == 200
        await wait_for(lambda: fake_cast.hung("send") >= 1)
        set_file_limit(serve, FULL)
        in_flight = fake_cast.hung("send")
        fake_cast.release("send")  # those sends complete; recording them cannot
        await wait_for(lambda: len(fake_cast.sent) >= in_flight, timeout=30)
        set_file_limit(serve, resource.RLIM_INFINITY)
        await wait_for(
            lambda: all(s[-1:] == ["delivered"] for s in final_statuses(fake_ghl, ids).values()),
            timeout=60,
        )
        assert await serve.terminate() == 0
    finally:
        serve.close()
    assert sorted(s["idempotency_key"] for s in fake_cast.sent) == ids
    assert serve.cli("check-config").returncode == 0
    assert fake_ghl.violations == [] and fake_cast.violations == []

"""The token lifecycle against the fake GHL, which enforces single-use refresh tokens: refresh at
startup and by the sweep, single-flight refresh, 401 handling, needs_reauth, inactive, no leaks."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlencode

import pytest
from tornado.httpclient import AsyncHTTPClient

from castghld.cli import main
from castghld.fakes import wait_for
from castghld.ghl import GHLError
from castghld.state import KeyRing, StateStore
from castghld.tokens import TokenUnavailable

# Sweeps that only run at startup (the next one is an hour away), refreshing what expires in 6 h.
STARTUP_SWEEP_ONLY = {"tokens": {"refresh_interval": "1h", "refresh_margin": "6h"}}
# No sweep refreshes a pair that expires in a minute: only callers needing the token do.
NO_SWEEP_REFRESH = {"tokens": {"refresh_interval": "1h", "refresh_margin": 1}}
NEAR_EXPIRY = 60  # seconds: inside every margin above but NO_SWEEP_REFRESH's, and expired for use


async def install_expiring(bridge, location_id: str, lifetime: int = NEAR_EXPIRY) -> dict:
    """Install through the real callback a pair that expires in `lifetime` seconds; its record."""
    normal = bridge.ghl.token_lifetime
    bridge.ghl.token_lifetime = lifetime
    try:
        await bridge.install(location_id)
    finally:
        bridge.ghl.token_lifetime = normal
    return bridge.daemon.installations.get(location_id)


def stored_on_disk(config_dir, location_id: str):
    """The install record as a fresh reader of the state file sees it (what survives a crash)."""
    store = StateStore(config_dir.state_dir, KeyRing.load(config_dir.key_path))
    try:
        store.load()
        return store.get("installs", location_id)
    finally:
        store.close()


def refresh_calls(fake_ghl):
    return [
        c
        for c in fake_ghl.calls_to("POST", "/oauth/token")
        if c.form["grant_type"] == "refresh_token"
    ]


def bearer_tokens(fake_ghl, path: str) -> list[str]:
    return [
        c.headers["Authorization"].removeprefix("Bearer ") for c in fake_ghl.calls_to("PUT", path)
    ]


# -- refresh by the sweep ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_startup_sweep_refreshes_a_pair_near_expiry_and_persists_it(bridge, config_dir):
    await bridge.start(STARTUP_SWEEP_ONLY)
    old = await install_expiring(bridge, "loc1")
    await bridge.stop()
    assert bridge.ghl.refresh_count["loc1"] == 0
    await bridge.start(STARTUP_SWEEP_ONLY)
    await wait_for(lambda: bridge.ghl.refresh_count["loc1"] == 1)
    await wait_for(
        lambda: stored_on_disk(config_dir, "loc1")["refresh_token"] != old["refresh_token"]
    )
    on_disk = stored_on_disk(config_dir, "loc1")
    assert on_disk["access_token"] != old["access_token"]
    assert on_disk["expires_at"] > time.time() + 80000
    assert on_disk["status"] == "ok"
    assert on_disk == bridge.daemon.installations.get("loc1")
    assert bridge.ghl.refresh_reuse == 0


@pytest.mark.gen_test
async def test_pair_refreshed_at_startup_is_used_after_a_restart(bridge):
    await bridge.start(STARTUP_SWEEP_ONLY)
    await install_expiring(bridge, "loc1")
    await bridge.stop()
    await bridge.start(STARTUP_SWEEP_ONLY)
    await wait_for(lambda: bridge.ghl.refresh_count["loc1"] == 1)
    await bridge.stop()
    daemon = await bridge.start(STARTUP_SWEEP_ONLY)
    new = daemon.installations.get("loc1")
    await bridge.update_status("loc1", "msg-1")
    assert bearer_tokens(bridge.ghl, "/conversations/messages/msg-1/status") == [
        new["access_token"]
    ]
    assert bridge.ghl.refresh_count["loc1"] == 1
    assert bridge.ghl.refresh_reuse == 0


@pytest.mark.gen_test
async def test_periodic_sweep_refreshes_a_pair_near_expiry(bridge, config_dir):
    await bridge.start({"tokens": {"refresh_interval": 1, "refresh_margin": "5m"}})
    old = await install_expiring(bridge, "loc1")  # after the startup sweep
    assert bridge.ghl.refresh_count["loc1"] == 0
    await wait_for(lambda: bridge.ghl.refresh_count["loc1"] == 1, timeout=3)
    await wait_for(
        lambda: stored_on_disk(config_dir, "loc1")["refresh_token"] != old["refresh_token"]
    )
    await bridge.stop()
    daemon = await bridge.start(STARTUP_SWEEP_ONLY)
    new = daemon.installations.get("loc1")
    assert new["access_token"] != old["access_token"]
    await bridge.update_status("loc1", "msg-1")
    assert bearer_tokens(bridge.ghl, "/conversations/messages/msg-1/status") == [
        new["access_token"]
    ]
    assert bridge.ghl.refresh_count["loc1"] == 1
    assert bridge.ghl.refresh_reuse == 0


@pytest.mark.gen_test
async def test_sweep_leaves_pairs_outside_the_margin_alone(bridge):
    await bridge.start(STARTUP_SWEEP_ONLY)
    await bridge.install("loc1")
    assert await bridge.daemon.installations.refresh_due() == 0
    assert refresh_calls(bridge.ghl) == []


@pytest.mark.gen_test
async def test_sweep_paces_refreshes(bridge):
    await bridge.start({"tokens": {"refresh_interval": "1h", "refresh_margin": "5m"}})
    locations = [f"loc{i:02d}" for i in range(12)]
    for location_id in locations:
        await install_expiring(bridge, location_id)
    assert await bridge.daemon.installations.refresh_due() == len(locations)
    times = sorted(c.time for c in refresh_calls(bridge.ghl))
    assert len(times) == 12
    # At most 10 refreshes a second (arrival times at the fake jitter by a few milliseconds).
    assert times[10] - times[0] >= 0.9
    assert bridge.ghl.refresh_reuse == 0


@pytest.mark.gen_test
async def test_failed_refresh_keeps_the_pair_and_is_retried(bridge):
    await bridge.start({"tokens": {"refresh_interval": "1h", "refresh_margin": "5m"}})
    old = await install_expiring(bridge, "loc1")
    bridge.ghl.fail_next("token", 503)
    installations = bridge.daemon.installations
    assert await installations.refresh_due() == 0
    assert installations.get("loc1") == old
    assert await installations.refresh_due() == 1
    assert installations.get("loc1")["refresh_token"] != old["refresh_token"]
    assert bridge.ghl.refresh_reuse == 0


# -- single-flight refresh and 401 ---------------------------------------------------------------


@pytest.mark.gen_test
async def test_twenty_concurrent_requests_needing_an_expired_token_refresh_once(bridge):
    await bridge.start(NO_SWEEP_REFRESH)
    old = await install_expiring(bridge, "loc1")
    bridge.ghl.hang("token")  # hold the refresh until every request waits for a token
    requests = asyncio.gather(*(bridge.update_status("loc1", f"msg-{i}") for i in range(20)))
    await wait_for(lambda: bridge.ghl.hung("token") == 1)
    bridge.ghl.release("token")
    await requests
    assert len(refresh_calls(bridge.ghl)) == 1
    assert bridge.ghl.refresh_count["loc1"] == 1
    assert bridge.ghl.refresh_reuse == 0
    new = bridge.daemon.installations.get("loc1")
    assert new["access_token"] != old["access_token"]
    used = bearer_tokens(bridge.ghl, "/conversations/messages/")
    assert used == [new["access_token"]] * 20  # no request went out with the old token


@pytest.mark.gen_test
async def test_twenty_concurrent_requests_meeting_401_refresh_once(bridge):
    await bridge.start(NO_SWEEP_REFRESH)
    await bridge.install("loc1")
    bridge.ghl.expire_access_tokens("loc1")
    await asyncio.gather(*(bridge.update_status("loc1", f"msg-{i}") for i in range(20)))
    assert bridge.ghl.refresh_count["loc1"] == 1
    assert bridge.ghl.refresh_reuse == 0
    assert all(bridge.ghl.statuses[f"msg-{i}"] == [{"status": "delivered"}] for i in range(20))


@pytest.mark.gen_test
async def test_401_for_a_token_refreshed_meanwhile_does_not_refresh_again(bridge):
    await bridge.start(NO_SWEEP_REFRESH)
    await bridge.install("loc1")
    bridge.ghl.expire_access_tokens("loc1")
    bridge.ghl.hang("token")
    first = asyncio.ensure_future(bridge.update_status("loc1", "msg-1"))  # 401, refreshing
    await wait_for(lambda: bridge.ghl.hung("token") == 1)
    bridge.ghl.hang("status")
    second = asyncio.ensure_future(bridge.update_status("loc1", "msg-2"))  # has the old token
    await wait_for(lambda: bridge.ghl.hung("status") == 1)
    bridge.ghl.release("token")
    await wait_for(lambda: bridge.ghl.hung("status") == 2)  # + the first one's retry
    bridge.ghl.release("status")  # the second meets 401 after the refresh has finished
    await asyncio.gather(first, second)
    assert bridge.ghl.refresh_count["loc1"] == 1
    assert bridge.ghl.refresh_reuse == 0
    assert bridge.ghl.statuses["msg-2"] == [{"status": "delivered"}]


@pytest.mark.gen_test
async def test_401_refreshes_once_and_retries_the_call(bridge):
    await bridge.start(NO_SWEEP_REFRESH)
    await bridge.install("loc1")
    old = bridge.daemon.installations.get("loc1")
    bridge.ghl.expire_access_tokens("loc1")
    await bridge.update_status("loc1", "msg-1")
    new = bridge.daemon.installations.get("loc1")
    assert bearer_tokens(bridge.ghl, "/conversations/messages/msg-1/status") == [
        old["access_token"],
        new["access_token"],
    ]
    assert bridge.ghl.statuses["msg-1"] == [{"status": "delivered"}]
    assert bridge.ghl.refresh_count["loc1"] == 1


@pytest.mark.gen_test
async def test_401_after_the_refresh_is_raised_without_another_refresh(bridge):
    await bridge.start(NO_SWEEP_REFRESH)
    await bridge.install("loc1")
    bridge.ghl.fail_next("status", 401, times=2)
    with pytest.raises(GHLError) as raised:
        await bridge.update_status("loc1", "msg-1")
    assert raised.value.status == 401
    assert len(bridge.ghl.calls_to("PUT", "/conversations/messages/msg-1/status")) == 2
    assert bridge.ghl.refresh_count["loc1"] == 1


# -- invalid_grant -> needs_reauth ---------------------------------------------------------------


async def revoked_at_restart(bridge) -> None:
    """loc1's refresh token is revoked while the daemon is down; the startup sweep meets it."""
    await bridge.start(STARTUP_SWEEP_ONLY)
    await install_expiring(bridge, "loc1")
    await bridge.stop()
    bridge.ghl.revoke("loc1")
    await bridge.start(STARTUP_SWEEP_ONLY)
    await wait_for(lambda: bridge.daemon.installations.get("loc1")["status"] == "needs_reauth")


@pytest.mark.gen_test
async def test_invalid_grant_marks_the_location_needs_reauth(bridge, config_dir):
    await revoked_at_restart(bridge)
    await wait_for(lambda: stored_on_disk(config_dir, "loc1")["status"] == "needs_reauth")
    assert bridge.ghl.refresh_reuse == 0


@pytest.mark.gen_test
async def test_needs_reauth_location_is_not_refreshed_again(bridge):
    await revoked_at_restart(bridge)
    installations = bridge.daemon.installations
    attempts = len(refresh_calls(bridge.ghl))
    assert await installations.refresh_due() == 0
    with pytest.raises(TokenUnavailable):
        await installations.access_token("loc1")
    with pytest.raises(TokenUnavailable):
        await bridge.update_status("loc1", "msg-1")
    assert len(refresh_calls(bridge.ghl)) == attempts
    assert bridge.ghl.calls_to("PUT", "/conversations/messages/") == []


@pytest.mark.gen_test
async def test_invalid_grant_is_logged_as_an_error_once(bridge, caplog):
    caplog.set_level(logging.INFO, logger="castghld")
    await revoked_at_restart(bridge)
    installations = bridge.daemon.installations
    await installations.refresh_due()
    with pytest.raises(TokenUnavailable):
        await installations.access_token("loc1")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "loc1" in errors[0].getMessage()
    assert "invalid_grant" in errors[0].getMessage()


@pytest.mark.gen_test
async def test_needs_reauth_is_exported_as_a_metric(bridge):
    await revoked_at_restart(bridge)
    response = await AsyncHTTPClient().fetch(bridge.daemon.url + "/metrics")
    lines = response.body.decode().splitlines()
    assert 'castghld_installations{status="needs_reauth"} 1.0' in lines
    assert 'castghld_installations{status="ok"} 0.0' in lines


@pytest.mark.gen_test
async def test_installs_command_shows_needs_reauth_and_no_token(bridge, config_dir, capsys):
    await revoked_at_restart(bridge)
    await bridge.install("loc2")
    record = bridge.daemon.installations.get("loc1")
    await bridge.stop()
    assert main(["--config", config_dir.config_path, "installs"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["loc1"][1] == "comp1"
    assert rows["loc1"][-2:] == ["needs_reauth", "direct"]
    assert rows["loc2"][-2:] == ["ok", "direct"]
    assert record["access_token"] not in out
    assert record["refresh_token"] not in out


# -- "Location is not active" -> inactive --------------------------------------------------------


@pytest.mark.gen_test
async def test_inactive_location_is_marked_inactive_and_keeps_its_tokens(bridge, config_dir):
    await bridge.start({"tokens": {"refresh_interval": "1h", "refresh_margin": "5m"}})
    old = await install_expiring(bridge, "loc1")
    bridge.ghl.deactivate("loc1")
    assert await bridge.daemon.installations.refresh_due() == 0
    record = bridge.daemon.installations.get("loc1")
    assert record["status"] == "inactive"
    assert record["access_token"] == old["access_token"]
    assert record["refresh_token"] == old["refresh_token"]
    assert stored_on_disk(config_dir, "loc1") == record


@pytest.mark.gen_test
async def test_inactive_location_is_refreshed_once_active_again(bridge):
    await bridge.start({"tokens": {"refresh_interval": "1h", "refresh_margin": "5m"}})
    old = await install_expiring(bridge, "loc1")
    bridge.ghl.deactivate("loc1")
    installations = bridge.daemon.installations
    await installations.refresh_due()
    bridge.ghl.reactivate("loc1")
    assert await installations.refresh_due() == 1
    record = installations.get("loc1")
    assert record["status"] == "ok"
    assert record["refresh_token"] != old["refresh_token"]
    assert bridge.ghl.refresh_count["loc1"] == 1
    assert bridge.ghl.refresh_reuse == 0


# -- no token in logs, errors or installs output -------------------------------------------------


def held_secrets(daemon) -> set[str]:
    found = set()
    for section in ("installs", "companies"):
        for _, record in daemon.state.items(section):
            found |= {record["access_token"], record["refresh_token"]}
    return found


@pytest.mark.gen_test
async def test_no_token_appears_in_any_log_record(bridge, caplog):
    caplog.set_level(logging.DEBUG)
    await bridge.start(STARTUP_SWEEP_ONLY)
    await install_expiring(bridge, "loc1")
    await install_expiring(bridge, "loc2")
    bridge.ghl.add_auth_code(
        "agency-code", company_id="agency1", user_type="Company", approved_locations=["locA"]
    )
    url = bridge.daemon.url + "/oauth/callback?" + urlencode({"code": "agency-code"})
    assert (await AsyncHTTPClient().fetch(url)).code == 200
    secrets = held_secrets(bridge.daemon) | {"test-secret"}
    await bridge.stop()
    bridge.ghl.revoke("loc2")
    await bridge.start(STARTUP_SWEEP_ONLY)  # refreshes loc1, invalid_grant for loc2
    await wait_for(lambda: bridge.ghl.refresh_count["loc1"] == 1)
    await wait_for(lambda: bridge.daemon.installations.get("loc2")["status"] == "needs_reauth")
    bridge.ghl.expire_access_tokens("locA")
    await bridge.update_status("locA", "msg-1")  # 401, refresh, retry
    secrets |= held_secrets(bridge.daemon)
    logged = [log_text(caplog, r) for r in caplog.records]
    assert any("refreshed token location=loc1" in text for text in logged)
    assert [(s, text) for s in secrets for text in logged if s in text] == []
    # The codes travel in the test's own requests, which curl's trace logs; not in the daemon's.
    ours = [log_text(caplog, r) for r in caplog.records if r.name.startswith("castghld")]
    assert any("/oauth/callback" in text for text in ours)
    codes = ("agency-code", "code-loc1", "code-loc2")
    assert [(c, text) for c in codes for text in ours if c in text] == []


def log_text(caplog, record: logging.LogRecord) -> str:
    """A record's message and traceback, unformatted (the scrubbing formatter is not relied on)."""
    text = record.getMessage()
    if record.exc_info:
        text += caplog.handler.formatter.formatException(record.exc_info)
    return text


@pytest.mark.gen_test
async def test_no_token_appears_in_errors(bridge):
    await revoked_at_restart(bridge)
    record = bridge.daemon.installations.get("loc1")
    await bridge.install("loc2")
    bridge.ghl.fail_next("status", 401, times=2)
    errors = []
    for location_id in ("loc1", "loc2"):
        with pytest.raises((TokenUnavailable, GHLError)) as raised:
            await bridge.update_status(location_id, "msg-1")
        errors.append(f"{raised.value} {raised.value!r}")
    bridge.ghl.fail_next("token", 400, {"error": "invalid_grant", "error_description": "bad"})
    bridge.ghl.add_auth_code("code-x", location_id="loc3")
    page = await AsyncHTTPClient().fetch(
        bridge.daemon.url + "/oauth/callback?code=code-x", raise_error=False
    )
    assert page.code == 400
    errors.append(page.body.decode())
    secrets = held_secrets(bridge.daemon) | {record["refresh_token"], "code-x", "test-secret"}
    assert [(s, e) for s in secrets for e in errors if s in e] == []


@pytest.mark.gen_test(timeout=30)
async def test_refresh_without_answer_at_shutdown_is_abandoned_not_stored_after_close(
    bridge, caplog, monkeypatch
):
    import castghld.tokens

    monkeypatch.setattr(castghld.tokens, "REFRESH_STOP_WAIT", 0.3)
    await bridge.start(NO_SWEEP_REFRESH)
    await install_expiring(bridge, "loc1")
    bridge.ghl.hang("refresh")
    refreshing = asyncio.ensure_future(bridge.daemon.installations.access_token("loc1"))
    await wait_for(lambda: bridge.ghl.hung("refresh") == 1)
    await bridge.stop()  # the state store is closed when this returns
    bridge.ghl.release("refresh")  # GHL's answer comes after the close
    with pytest.raises(asyncio.CancelledError):
        await refreshing
    await wait_for(lambda: bridge.ghl.hung("refresh") == 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("no answer yet to the token request for location=loc1" in m for m in messages)
    assert not any("after shutdown" in m or "Traceback" in m for m in messages)


@pytest.mark.gen_test
@pytest.mark.parametrize("lifetime", [-5, 0, float("inf"), float("nan"), 10**12])
async def test_token_answer_with_unusable_expires_in_gets_a_day(bridge, lifetime):
    """A pair whose expires_in is negative, zero, infinite, NaN or absurd would be refreshed on
    every use or never ahead of time: it is taken as GHL's usual ~1 day."""
    await bridge.start()
    bridge.ghl.token_lifetime = lifetime
    await bridge.install("loc1")
    expires_in = bridge.daemon.installations.get("loc1")["expires_at"] - time.time()
    assert 86000 < expires_in < 86400

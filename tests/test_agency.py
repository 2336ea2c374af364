"""Agency and bulk installs that always complete, and install/uninstall/refresh ordering (issue 8
§1-2), against the strict fake GHL (installedLocations, INSTALL before the callback, 429 mints)."""

from __future__ import annotations

import asyncio
import json
import resource

import pytest
from test_oauth import (
    app_event,
    callback,
    iso_timestamp,
    post_app_webhook,
    status_update_succeeds,
    stored_on_disk,
    token_calls,
)
from tornado.httpclient import AsyncHTTPClient

from castghld.cli import main
from castghld.fakes import wait_for

AGENCY = "agency1"


async def agency_callback(bridge, approved: list[str], company_id: str = AGENCY):
    """The OAuth callback of an agency (Company) install approving `approved` locations."""
    code = f"agency-code-{company_id}-{len(bridge.ghl.calls)}"
    bridge.ghl.add_auth_code(
        code, company_id=company_id, user_type="Company", approved_locations=approved
    )
    response = await callback(bridge, code=code)
    assert response.code == 200, response.body
    return response


def usable(bridge, *location_ids: str) -> bool:
    installations = bridge.daemon.installations
    return all((installations.get(lid) or {}).get("status") == "ok" for lid in location_ids)


async def agency_installed(bridge, approved: list[str], extra: dict | None = None) -> None:
    """Start the daemon, install an agency approving `approved`, let its reconciliation end."""
    await bridge.start(extra)
    await agency_callback(bridge, approved)
    await reconciled(bridge)


async def reconciled(bridge) -> None:
    """Wait until no reconciliation runs in the background."""
    installations = bridge.daemon.installations
    await wait_for(
        lambda: installations._reconcile_task is None or installations._reconcile_task.done()
    )


# -- §1: bulk installs ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_bulk_install_with_install_webhooks_first_and_no_company_id_installs_all(
    bridge, config_dir, capsys
):
    await bridge.start()
    for location_id in ("locA", "locB", "locC"):
        bridge.ghl.add_company_location(AGENCY, location_id)  # GHL installed the app there
    # INSTALL webhooks before the callback: one with companyId, one without; locC sends none.
    assert (await post_app_webhook(bridge, app_event("INSTALL", "locA", AGENCY))).code == 200
    event = app_event("INSTALL", "locB")
    del event["companyId"]
    assert (await post_app_webhook(bridge, event)).code == 200
    assert sorted(bridge.daemon.installations.pending()) == ["locA", "locB"]
    # Kept durably: a restart between the webhooks and the callback loses nothing.
    await bridge.stop()
    assert stored_on_disk(config_dir, "pending_installs", "locB") is not None
    assert main(["--config", config_dir.config_path, "installs"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["locA"] == ["locA", AGENCY, "-", "pending", "webhook"]
    assert rows["locB"] == ["locB", "-", "-", "pending", "webhook"]
    await bridge.start()
    await agency_callback(bridge, approved=[])  # bulk install: the answer lists no location
    await wait_for(lambda: usable(bridge, "locA", "locB", "locC"))
    await reconciled(bridge)
    assert bridge.daemon.installations.pending() == []
    assert stored_on_disk(config_dir, "pending_installs", "locB") is None
    for location_id in ("locA", "locB", "locC"):
        await status_update_succeeds(bridge, location_id, f"msg-{location_id}")
    listing = bridge.ghl.calls_to("GET", "/oauth/installedLocations")
    assert listing and listing[0].query["appId"] == "test"
    assert listing[0].headers["Version"] == "2021-07-28"


@pytest.mark.gen_test(timeout=30)
async def test_mint_answered_429_is_retried_and_the_location_installed(bridge):
    await bridge.start()
    bridge.ghl.fail_next("location_token", 429, headers={"Retry-After": "0"})
    response = await agency_callback(bridge, ["locA", "locB"])
    assert b"Could not install" not in response.body
    assert usable(bridge, "locA", "locB")
    assert len(bridge.ghl.calls_to("POST", "/oauth/locationToken")) == 3
    await status_update_succeeds(bridge, "locA", "msg-a")


@pytest.mark.gen_test(timeout=30)
async def test_failed_mint_is_completed_by_the_next_reconciliation(bridge):
    await bridge.start()
    bridge.ghl.add_company_location(AGENCY, "locC")
    bridge.ghl.deactivate("locC")  # GHL refuses its mint for now
    await agency_callback(bridge, ["locA", "locC"])
    await reconciled(bridge)
    assert usable(bridge, "locA") and not usable(bridge, "locC")
    assert bridge.daemon.installations.pending() == ["locC"]
    bridge.ghl.reactivate("locC")
    report = await bridge.daemon.installations.reconcile()
    assert report["minted"] == ["locC"]
    assert usable(bridge, "locC")
    assert bridge.daemon.installations.pending() == []


@pytest.mark.gen_test(timeout=30)
async def test_location_uninstalled_while_down_is_not_texted_after_reconciliation(bridge):
    await agency_installed(bridge, ["locA", "locB"])
    await bridge.stop()
    bridge.ghl.uninstall_app("locB")  # the UNINSTALL webhook went nowhere
    await bridge.start()  # a reconciliation runs at startup
    await wait_for(lambda: stored_status(bridge, "locB") == "uninstalled")
    response = await bridge.post_message(locationId="locB", messageId="m-b")
    assert response.code == 200
    assert json.loads(response.body)["status"] == "ignored"
    response = await bridge.post_message(locationId="locA", messageId="m-a")
    assert response.code == 200
    await wait_for(lambda: len(bridge.cast.sent) == 1)
    assert bridge.cast.sent[0]["idempotency_key"] == "m-a"


def stored_status(bridge, location_id: str) -> str | None:
    record = bridge.daemon.state.get("installs", location_id)
    return record and record.get("status")


@pytest.mark.gen_test(timeout=30)
async def test_invalid_grant_on_a_minted_location_re_mints_and_the_sms_is_sent(bridge):
    await agency_installed(bridge, ["locA"])
    bridge.ghl.revoke("locA")  # its refresh token now gets invalid_grant
    bridge.ghl.expire_access_tokens("locA")  # and its access token 401
    response = await bridge.post_message(locationId="locA", messageId="m-remint")
    assert response.code == 200
    await wait_for(
        lambda: [s["status"] for s in bridge.ghl.statuses["m-remint"]][-1:] == ["delivered"]
    )
    assert len(bridge.cast.sent) == 1
    record = bridge.daemon.installations.get("locA")
    assert record["status"] == "ok" and record["source"] == "agency"
    assert bridge.ghl.refresh_reuse == 0


# -- app webhooks: appId, ordering ----------------------------------------------------------------


@pytest.mark.gen_test
async def test_uninstall_of_another_app_keeps_the_tokens(bridge):
    await bridge.start()
    await bridge.install("loc1")
    event = app_event("UNINSTALL", "loc1", appId="someone-elses-app")
    response = await post_app_webhook(bridge, event)
    assert response.code == 200
    assert json.loads(response.body)["status"] == "ignored"
    await status_update_succeeds(bridge, "loc1", "msg-1")


@pytest.mark.gen_test
async def test_uninstall_older_than_a_reinstall_keeps_the_tokens(bridge, config_dir):
    await bridge.start()
    await bridge.install("loc1")
    late = app_event("UNINSTALL", "loc1", timestamp=iso_timestamp(seconds_ago=60))
    response = await post_app_webhook(bridge, late)
    assert response.code == 200
    assert stored_on_disk(config_dir, "installs", "loc1") is not None
    await status_update_succeeds(bridge, "loc1", "msg-1")


@pytest.mark.gen_test
@pytest.mark.parametrize("junk", ["0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z", 0, -5])
async def test_uninstall_with_a_junk_timestamp_is_dated_by_its_arrival(bridge, config_dir, junk):
    """A timestamp no real event has (year 1, the epoch, negative) is unreadable, as ISO text
    as well as a number: the UNINSTALL is not taken as older than the install."""
    await bridge.start()
    await bridge.install("loc1")
    event = app_event("UNINSTALL", "loc1", timestamp=junk)
    assert (await post_app_webhook(bridge, event)).code == 200
    assert bridge.daemon.installations.get("loc1") is None
    assert stored_on_disk(config_dir, "installs", "loc1") is None


@pytest.mark.gen_test
async def test_uninstall_without_timestamp_or_webhook_id_is_dated_by_its_arrival(
    bridge, config_dir
):
    """The body GHL's app-uninstall doc shows has neither: it uninstalls, and an INSTALL dated
    before its arrival (a late retry) does not undo it."""
    await bridge.start()
    await bridge.install("loc1")
    event = app_event("UNINSTALL", "loc1")
    del event["timestamp"], event["webhookId"]
    assert (await post_app_webhook(bridge, event)).code == 200
    assert bridge.daemon.installations.get("loc1") is None
    assert stored_on_disk(config_dir, "installs", "loc1") is None
    late = app_event("INSTALL", "loc1", "comp1", timestamp=iso_timestamp(seconds_ago=60))
    assert (await post_app_webhook(bridge, late)).code == 200
    assert bridge.daemon.installations.get("loc1") is None
    assert bridge.daemon.installations.pending() == []


@pytest.mark.gen_test
async def test_install_older_than_the_last_uninstall_is_ignored(bridge):
    await agency_installed(bridge, ["locA"])
    assert (await post_app_webhook(bridge, app_event("UNINSTALL", "locA", AGENCY))).code == 200
    mints = len(bridge.ghl.calls_to("POST", "/oauth/locationToken"))
    old = app_event("INSTALL", "locA", AGENCY, timestamp=iso_timestamp(seconds_ago=120))
    response = await post_app_webhook(bridge, old)
    assert response.code == 200
    assert "ignored" in json.loads(response.body)["status"]
    assert len(bridge.ghl.calls_to("POST", "/oauth/locationToken")) == mints
    assert bridge.daemon.installations.get("locA") is None


@pytest.mark.gen_test
async def test_unusable_authentic_app_webhook_is_200_and_counted(bridge):
    await bridge.start()
    await bridge.install("loc1")
    for body in (
        b"[1, 2]",
        b"not json",
        json.dumps(app_event("UNINSTALL", locationId=[1])).encode(),
    ):
        response = await bridge.ghl.post_webhook(
            bridge.daemon.url + "/api/ghl/v1/webhook/app", body
        )
        assert response.code == 200, body
    assert bridge.daemon.installations.get("loc1") is not None
    metric = bridge.daemon.metrics.webhooks.labels("app", "unusable")._value.get()
    assert metric == 3


# -- §2: refresh vs reinstall ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_refresh_answer_after_uninstall_and_reinstall_keeps_the_reinstall_pair(bridge):
    await bridge.start()
    bridge.ghl.token_lifetime = 60  # inside EXPIRY_SLACK: the next use refreshes
    await bridge.install("loc1")
    bridge.ghl.token_lifetime = 86399
    installations = bridge.daemon.installations
    bridge.ghl.hang("refresh")
    refreshing = asyncio.ensure_future(installations.access_token("loc1"))
    await wait_for(lambda: bridge.ghl.hung("refresh") == 1)
    assert (await post_app_webhook(bridge, app_event("UNINSTALL", "loc1"))).code == 200
    await bridge.install("loc1")  # reinstall: a new code exchange
    reinstalled = installations.get("loc1")
    bridge.ghl.release("refresh")
    assert await refreshing == reinstalled["access_token"]
    assert installations.get("loc1") == reinstalled
    await status_update_succeeds(bridge, "loc1", "msg-1")


# -- §6: the token call ---------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_token_calls_carry_no_version_header(bridge):
    await bridge.start()
    await bridge.install("loc1")
    (exchange,) = token_calls(bridge.ghl, "authorization_code")
    assert "Version" not in exchange.headers


# -- castghld reconcile / installs ----------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_reconcile_command_mints_and_marks_and_prints_it(bridge, config_dir, capsys):
    await agency_installed(bridge, ["locA", "locB"])
    await bridge.stop()
    bridge.ghl.uninstall_app("locB")
    bridge.ghl.add_company_location(AGENCY, "locC")
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, main, ["--config", config_dir.config_path, "reconcile"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "minted" in out and "locC" in out
    assert "uninstalled" in out and "locB" in out
    assert stored_on_disk(config_dir, "installs", "locC")["source"] == "reconciled"
    assert main(["--config", config_dir.config_path, "installs"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["locA"][-1] == "agency" and rows["locC"][-1] == "reconciled"
    assert rows["locB"][-2] == "uninstalled"


# -- issue 11: an install that could not be saved is not installed later --------------------------


@pytest.mark.gen_test(timeout=90)
async def test_install_answered_503_for_a_full_disk_is_not_installed_later(
    config_dir, fake_ghl, fake_cast
):
    from daemon_process import ServeProcess

    serve = ServeProcess(config_dir, fake_ghl, fake_cast, log_to_file=False)
    try:
        await serve.start()
        await serve.install("loc1")
        # Every write past the first 64 bytes of any file now fails (EFBIG), as on a full disk.
        unlimited = resource.RLIM_INFINITY
        resource.prlimit(serve.proc.pid, resource.RLIMIT_FSIZE, (64, unlimited))
        fake_ghl.add_auth_code("code-loc2", location_id="loc2")
        response = await AsyncHTTPClient().fetch(
            f"{serve.url}/oauth/callback?code=code-loc2", raise_error=False
        )
        assert response.code == 503
        resource.prlimit(serve.proc.pid, resource.RLIMIT_FSIZE, (unlimited, unlimited))
        await serve.install("loc3")  # the next commit must not carry loc2 along
        serve.kill9()
    finally:
        serve.close()
    assert stored_on_disk(config_dir, "installs", "loc2") is None
    assert stored_on_disk(config_dir, "installs", "loc3") is not None
    assert stored_on_disk(config_dir, "installs", "loc1") is not None
    assert fake_ghl.violations == []


@pytest.mark.gen_test(timeout=30)
async def test_undated_uninstall_retried_after_restart_and_reinstall_keeps_the_tokens(bridge):
    await bridge.start()
    await bridge.install("loc1")
    event = app_event("UNINSTALL", "loc1")
    del event["timestamp"]
    assert (await post_app_webhook(bridge, event)).code == 200
    assert bridge.daemon.installations.get("loc1") is None
    await bridge.stop()  # the in-memory webhookId dedupe is gone
    await bridge.start()
    bridge.ghl.add_auth_code("code-again", location_id="loc1")
    assert (await callback(bridge, code="code-again")).code == 200
    assert (await post_app_webhook(bridge, event)).code == 200  # GHL's retry of the same one
    await status_update_succeeds(bridge, "loc1", "msg-1")


@pytest.mark.gen_test(timeout=30)
async def test_empty_installed_list_marks_nothing(bridge):
    await agency_installed(bridge, ["locA"])
    bridge.ghl.uninstall_app("locA")  # GHL now lists nothing (as for a wrong ghl.app_id)
    report = await bridge.daemon.installations.reconcile()
    assert report["marked"] == [] and AGENCY in report["companies"]
    assert usable(bridge, "locA")


@pytest.mark.gen_test(timeout=30)
async def test_reconciliation_runs_every_reconcile_interval(bridge):
    await agency_installed(bridge, ["locA", "locB"], {"tokens": {"reconcile_interval": "1s"}})
    bridge.ghl.uninstall_app("locB")
    await wait_for(lambda: stored_status(bridge, "locB") == "uninstalled", timeout=10)
    assert usable(bridge, "locA")


@pytest.mark.gen_test(timeout=30)
async def test_a_list_ghl_fails_to_give_marks_nothing(bridge):
    await agency_installed(bridge, ["locA", "locB"])
    bridge.ghl.uninstall_app("locB")
    bridge.ghl.fail_next("installed_locations", 500)
    report = await bridge.daemon.installations.reconcile()
    assert report["marked"] == [] and AGENCY in report["companies"]
    assert usable(bridge, "locA", "locB")


@pytest.mark.gen_test(timeout=30)
async def test_company_install_webhook_without_location_reconciles_the_company(bridge):
    await agency_installed(bridge, ["locA"])
    bridge.ghl.add_company_location(AGENCY, "locN")  # installed for a new location
    response = await post_app_webhook(bridge, app_event("INSTALL", company_id=AGENCY))
    assert response.code == 200
    await wait_for(lambda: usable(bridge, "locN"))
    assert bridge.daemon.installations.get("locN")["source"] == "reconciled"


@pytest.mark.gen_test(timeout=30)
async def test_installed_locations_reads_every_page(bridge):
    await bridge.start()
    answer = bridge.ghl.issue_company_tokens(AGENCY, [f"loc{n:03d}" for n in range(250)])
    listed = await bridge.daemon.ghl.installed_locations(answer["access_token"], AGENCY)
    assert listed == [f"loc{n:03d}" for n in range(250)]
    pages = bridge.ghl.calls_to("GET", "/oauth/installedLocations")
    assert [c.query["skip"] for c in pages] == ["0", "100", "200"]


# -- castghld forget ----------------------------------------------------------------------------


async def forget(config_dir, location_id: str) -> int:
    """`castghld forget LOCATION` against the running daemon (through its admin socket)."""
    loop = asyncio.get_running_loop()
    argv = ["--config", config_dir.config_path, "forget", location_id]
    return await loop.run_in_executor(None, main, argv)


@pytest.mark.gen_test(timeout=30)
async def test_forgotten_location_is_not_minted_again_by_reconciliation(bridge, config_dir):
    await agency_installed(bridge, ["locA", "locB"])
    assert await forget(config_dir, "locB") == 0
    report = await bridge.daemon.installations.reconcile()  # GHL still lists locB
    assert report["minted"] == [] and bridge.daemon.installations.get("locB") is None
    await bridge.stop()
    await bridge.start()  # the reconciliation at startup
    await reconciled(bridge)
    assert bridge.daemon.installations.get("locB") is None
    assert bridge.daemon.installations.pending() == []
    response = await bridge.post_message(locationId="locB", messageId="m-b")
    assert json.loads(response.body)["status"] == "ignored"
    assert usable(bridge, "locA")


@pytest.mark.gen_test(timeout=30)
async def test_forgotten_location_is_installed_again_by_a_new_install_webhook(bridge, config_dir):
    await agency_installed(bridge, ["locA", "locB"])
    assert await forget(config_dir, "locB") == 0
    assert (await post_app_webhook(bridge, app_event("INSTALL", "locB", AGENCY))).code == 200
    await wait_for(lambda: usable(bridge, "locB"))
    await bridge.daemon.installations.reconcile()
    assert usable(bridge, "locB")
    await status_update_succeeds(bridge, "locB", "msg-b")


@pytest.mark.gen_test(timeout=30)
async def test_forgotten_location_is_installed_again_through_the_oauth_callback(bridge, config_dir):
    await agency_installed(bridge, ["locA", "locB"])
    assert await forget(config_dir, "locB") == 0
    await bridge.install("locB", company_id=AGENCY)
    assert usable(bridge, "locB")
    await bridge.stop()
    bridge.ghl.revoke("locB")  # its pair is refused: re-minted from the agency token
    await bridge.start()
    await reconciled(bridge)
    await status_update_succeeds(bridge, "locB", "msg-b")
    assert usable(bridge, "locB")


@pytest.mark.gen_test(timeout=30)
async def test_location_forgotten_while_a_reconciliation_confirms_it_stays_forgotten(
    bridge, config_dir
):
    """Ten locations missing from GHL's list are confirmed by mints, eight at a time: one
    forgotten while it waits for its turn is not minted again when its turn comes."""
    hidden = [f"loc{n}" for n in range(10)]
    await agency_installed(bridge, ["locA", *hidden])
    bridge.ghl.hidden_from_list.update(hidden)  # installed, but GHL's list lags
    before = len(bridge.ghl.calls_to("POST", "/oauth/locationToken"))
    bridge.ghl.hang("location_token")
    reconciliation = asyncio.ensure_future(bridge.daemon.installations.reconcile())
    await wait_for(lambda: bridge.ghl.hung("location_token") == 8)
    calls = bridge.ghl.calls_to("POST", "/oauth/locationToken")[before:]
    asked = {c.form["locationId"] for c in calls}
    waiting = sorted(set(hidden) - asked)[0]
    assert await forget(config_dir, waiting) == 0
    bridge.ghl.release("location_token")
    await reconciliation
    assert bridge.daemon.installations.get(waiting) is None
    assert stored_on_disk(config_dir, "installs", waiting) is None
    assert stored_on_disk(config_dir, "forgotten", waiting) is not None


@pytest.mark.gen_test(timeout=30)
async def test_uninstall_older_than_an_install_webhook_heard_since_keeps_the_location(
    bridge, config_dir
):
    """GHL's UNINSTALL (dated 30 s ago) is delivered late, after the INSTALL webhook of the
    reinstall that followed it (dated now, answered "already installed"): across a restart, the
    location stays installed, as it would had the INSTALL come second."""
    await agency_installed(bridge, ["locA", "locB"])
    state = bridge.daemon.state
    record = state.get("installs", "locB")
    state.put("installs", "locB", {**record, "installed_at": record["installed_at"] - 60})
    await state.commit()  # installed a minute ago
    reinstall = app_event("INSTALL", "locB", AGENCY)
    assert (await post_app_webhook(bridge, reinstall)).code == 200
    await bridge.stop()
    await bridge.start()
    late = app_event("UNINSTALL", "locB", AGENCY, timestamp=iso_timestamp(seconds_ago=30))
    assert (await post_app_webhook(bridge, late)).code == 200
    assert stored_on_disk(config_dir, "installs", "locB") is not None
    assert bridge.daemon.installations.get("locB") is not None


@pytest.mark.gen_test(timeout=30)
async def test_uninstall_stamped_in_the_millisecond_of_the_install_uninstalls(bridge):
    """GHL's timestamps are milliseconds: one in the install's own millisecond is truncated to
    before it, yet cannot be older than it (it came after the install answered)."""
    import datetime

    await bridge.start()
    await bridge.install("locT")
    installed_at = bridge.daemon.installations.get("locT")["installed_at"]
    same_ms = datetime.datetime.fromtimestamp(installed_at, datetime.timezone.utc)
    stamp = same_ms.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = app_event("UNINSTALL", "locT", timestamp=stamp)
    assert (await post_app_webhook(bridge, event)).code == 200
    assert bridge.daemon.installations.get("locT") is None

"""Reconciliation reads GHL's whole list of installed locations however GHL pages it, and marks a
location ``uninstalled`` only once that is confirmed (issue 16 §1), against the fake GHL's paging
switches (`installed_page_cap`, `installed_ignores_skip`, `uninstall_after_pages`,
`hidden_from_list`)."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_agency import AGENCY, agency_installed, reconciled, stored_status, usable
from test_oauth import app_event, post_app_webhook, stored_on_disk

from castghld.cli import main
from castghld.fakes import wait_for
from castghld.ghl import IncompleteList

LOCATIONS = [f"loc{n:02d}" for n in range(45)]


def mints(bridge) -> int:
    return len(bridge.ghl.calls_to("POST", "/oauth/locationToken"))


# -- reading the list ------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_installed_locations_reads_past_pages_capped_below_the_limit(bridge):
    await bridge.start()
    bridge.ghl.installed_page_cap = 50  # asked for 100, serves 50
    answer = bridge.ghl.issue_company_tokens(AGENCY, [f"loc{n:03d}" for n in range(120)])
    listed = await bridge.daemon.ghl.installed_locations(answer["access_token"], AGENCY)
    assert listed == [f"loc{n:03d}" for n in range(120)]
    pages = bridge.ghl.calls_to("GET", "/oauth/installedLocations")
    assert [c.query["skip"] for c in pages] == ["0", "50", "100"]


@pytest.mark.gen_test(timeout=30)
async def test_installed_locations_from_a_server_ignoring_skip_is_incomplete(bridge):
    await bridge.start()
    bridge.ghl.installed_ignores_skip = True
    answer = bridge.ghl.issue_company_tokens(AGENCY, [f"loc{n:03d}" for n in range(250)])
    with pytest.raises(IncompleteList) as raised:
        await bridge.daemon.ghl.installed_locations(answer["access_token"], AGENCY)
    assert raised.value.ids == [f"loc{n:03d}" for n in range(100)]
    assert len(bridge.ghl.calls_to("GET", "/oauth/installedLocations")) == 2


@pytest.mark.gen_test(timeout=30)
async def test_installed_locations_read_again_when_a_location_leaves_between_pages(bridge):
    """loc005 leaves after the first page: the second page (skip=100) starts one further on,
    so loc100 would be in neither page."""
    await bridge.start()
    answer = bridge.ghl.issue_company_tokens(AGENCY, [f"loc{n:03d}" for n in range(150)])
    bridge.ghl.uninstall_after_pages("loc005", pages=1)
    listed = await bridge.daemon.ghl.installed_locations(answer["access_token"], AGENCY)
    assert listed == [f"loc{n:03d}" for n in range(150) if n != 5]


# -- what a reconciliation marks -------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_reconciliation_with_pages_capped_below_the_limit_marks_nothing(bridge):
    await agency_installed(bridge, LOCATIONS)
    bridge.ghl.installed_page_cap = 20  # GHL's default page
    minted = mints(bridge)
    report = await bridge.daemon.installations.reconcile()
    assert report["marked"] == [] and report["companies"] == {}
    assert usable(bridge, *LOCATIONS)
    assert mints(bridge) == minted  # the list was whole: nothing needed confirming


@pytest.mark.gen_test(timeout=60)
async def test_reconciliation_on_a_server_ignoring_skip_marks_nothing(bridge):
    await agency_installed(bridge, LOCATIONS)
    bridge.ghl.installed_page_cap = 20
    bridge.ghl.installed_ignores_skip = True
    report = await bridge.daemon.installations.reconcile()
    assert report["marked"] == [] and AGENCY in report["companies"]
    assert usable(bridge, *LOCATIONS)


@pytest.mark.gen_test(timeout=60)
async def test_uninstall_between_page_reads_marks_only_the_uninstalled_location(bridge):
    await agency_installed(bridge, LOCATIONS)
    bridge.ghl.installed_page_cap = 20
    bridge.ghl.uninstall_after_pages("loc05", pages=1)  # loc20 shifts into the first page
    report = await bridge.daemon.installations.reconcile()
    assert report["marked"] == ["loc05"]  # GHL refuses to mint its token: confirmed
    assert usable(bridge, *(lid for lid in LOCATIONS if lid != "loc05"))
    response = await bridge.post_message(locationId="loc05", messageId="m-05")
    assert json.loads(response.body)["status"] == "ignored"


@pytest.mark.gen_test(timeout=30)
async def test_location_missing_from_a_list_but_minted_by_ghl_is_not_marked(bridge):
    await agency_installed(bridge, ["locA", "locB"])
    bridge.ghl.hidden_from_list.add("locB")  # installed, but GHL's list lags
    report = await bridge.daemon.installations.reconcile()
    assert report["marked"] == []
    assert usable(bridge, "locA", "locB")
    response = await bridge.post_message(locationId="locB", messageId="m-b")
    assert json.loads(response.body)["status"] != "ignored"


@pytest.mark.gen_test(timeout=30)
async def test_location_missing_from_two_consecutive_complete_lists_is_marked(bridge):
    """GHL neither lists locB nor mints it ("Location is not active" says nothing about the
    install): one list is not enough; the next complete one, after a restart, confirms it."""
    await agency_installed(bridge, ["locA", "locB"])
    bridge.ghl.hidden_from_list.add("locB")
    bridge.ghl.deactivate("locB")
    report = await bridge.daemon.installations.reconcile()
    assert report["marked"] == [] and stored_status(bridge, "locB") == "ok"
    await bridge.stop()
    await bridge.start()  # its reconciliation at startup is the second read
    await wait_for(lambda: stored_status(bridge, "locB") == "uninstalled")
    await reconciled(bridge)
    assert usable(bridge, "locA")


@pytest.mark.gen_test(timeout=30)
async def test_a_list_that_names_the_location_again_restarts_its_confirmation(bridge):
    await agency_installed(bridge, ["locA", "locB"])
    bridge.ghl.deactivate("locB")
    bridge.ghl.hidden_from_list.add("locB")
    assert (await bridge.daemon.installations.reconcile())["marked"] == []
    bridge.ghl.hidden_from_list.discard("locB")
    assert (await bridge.daemon.installations.reconcile())["marked"] == []
    bridge.ghl.hidden_from_list.add("locB")
    assert (await bridge.daemon.installations.reconcile())["marked"] == []
    assert stored_status(bridge, "locB") == "ok"
    departed: list[str] = []
    bridge.daemon.installations.on_departed.append(departed.append)
    assert (await bridge.daemon.installations.reconcile())["marked"] == ["locB"]
    assert departed == ["locB"]


@pytest.mark.gen_test(timeout=30)
async def test_reconcile_command_prints_a_location_missing_but_not_confirmed(
    bridge, config_dir, capsys
):
    await agency_installed(bridge, ["locA", "locB"])
    await bridge.stop()
    bridge.ghl.hidden_from_list.add("locB")
    bridge.ghl.deactivate("locB")
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, main, ["--config", config_dir.config_path, "reconcile"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "unconfirmed  locB" in out and "no changes" in out
    assert stored_on_disk(config_dir, "installs", "locB")["status"] == "ok"
    assert stored_on_disk(config_dir, "unlisted", "locB") is not None


@pytest.mark.gen_test(timeout=30)
async def test_install_webhook_during_a_refused_confirmation_keeps_the_location(bridge):
    """locB leaves GHL's list and GHL refuses its mint, but GHL's INSTALL webhook for it arrives
    while that mint is in flight (a reinstall after the list was asked for): it is not marked."""
    await agency_installed(bridge, ["locA", "locB"])
    bridge.ghl.uninstall_app("locB")  # its UNINSTALL webhook went nowhere
    bridge.ghl.hang("location_token")
    reconciliation = asyncio.ensure_future(bridge.daemon.installations.reconcile())
    await wait_for(lambda: bridge.ghl.hung("location_token") == 1)
    event = app_event("INSTALL", "locB", AGENCY)
    response = await post_app_webhook(bridge, event)
    assert response.code == 200
    bridge.ghl.release("location_token")
    report = await reconciliation
    assert report["marked"] == []
    assert stored_status(bridge, "locB") == "ok"


@pytest.mark.gen_test(timeout=30)
async def test_install_webhook_after_a_first_absence_restarts_its_confirmation(bridge):
    """locB is missing from one complete list (GHL's mint says nothing: "not active"), then
    GHL's INSTALL webhook for it arrives: the next complete list, after a restart, is a first
    absence again, not the second that marks it."""
    await agency_installed(bridge, ["locA", "locB"])
    bridge.ghl.hidden_from_list.add("locB")
    bridge.ghl.deactivate("locB")
    assert (await bridge.daemon.installations.reconcile())["unconfirmed"] == ["locB"]
    first = bridge.daemon.state.get("unlisted", "locB")
    response = await post_app_webhook(bridge, app_event("INSTALL", "locB", AGENCY))
    assert response.code == 200
    await bridge.stop()
    await bridge.start()  # its reconciliation at startup reads the list again

    def noted_or_marked() -> bool:
        noted = bridge.daemon.state.get("unlisted", "locB")
        return (noted is not None and noted != first) or stored_status(bridge, "locB") != "ok"

    await wait_for(noted_or_marked)
    assert stored_status(bridge, "locB") == "ok"

"""Offline commands touch only what they are for: `castghld reconcile` run while the daemon is
stopped mints and marks locations, and leaves the replies waiting in the outbox to `serve`."""

from __future__ import annotations

import asyncio

import pytest

from castghld.cli import main
from castghld.fakes import wait_for
from tests.test_agency import AGENCY, agency_installed

INBOUND = "/conversations/messages/inbound"
LOC_C_NUMBER = "09170000005"  # mapped to locC, which is not installed yet
EXTRA = {"cast": {"locations": {"locC": {"inbound_numbers": [LOC_C_NUMBER]}}}}


async def post_reply(bridge, message_id: str, to: str) -> None:
    payload = {
        "message_id": message_id,
        "from": "09181234567",
        "to": to,
        "message": "a reply for locC",
        "received_at": "2026-11-26T09:00:00Z",
    }
    url = bridge.daemon.url + "/api/cast/v1/webhook/inbound"
    response = await bridge.cast.post_inbound(url, "inbound-secret", payload)
    assert response.code == 200


@pytest.mark.gen_test(timeout=60)
async def test_offline_reconcile_mints_without_posting_a_waiting_reply_and_serve_posts_it_once(
    bridge, config_dir, capsys
):
    await agency_installed(bridge, ["locA"], EXTRA)
    await post_reply(bridge, "CASTIN-WAIT", LOC_C_NUMBER)
    await wait_for(lambda: len(bridge.daemon.outbox.records) == 1)
    await bridge.stop()
    bridge.ghl.add_company_location(AGENCY, "locC")  # GHL now lists the reply's location
    loop = asyncio.get_running_loop()
    code = await loop.run_in_executor(None, main, ["--config", config_dir.config_path, "reconcile"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "minted" in out and "locC" in out
    assert bridge.ghl.calls_to("POST", INBOUND) == []
    assert bridge.ghl.calls_to("POST", "/contacts/upsert") == []
    await bridge.start(EXTRA)
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert len(bridge.ghl.calls_to("POST", INBOUND)) == 1
    [message] = bridge.ghl.inbound_messages
    assert message["altId"] == "CASTIN-WAIT" and message["locationId"] == "locC"

"""`castghld accounts` through the running daemon's admin socket (issue 17 item 3)."""

from __future__ import annotations

import asyncio
import json

import pytest

from castghld import cli
from castghld.fakes import wait_for
from tests.test_account_pause import finals, post_many

KEY_B = "cast_live_key_of_b"


async def run_cli(capsys, *argv) -> tuple[int, str]:
    """The command in a thread: the daemon answering it runs on this test's loop."""
    code = await asyncio.get_running_loop().run_in_executor(None, cli.main, list(argv))
    return code, capsys.readouterr().out


@pytest.mark.gen_test(timeout=60)
async def test_accounts_shows_each_account_paused_or_ok_with_credits_and_waiting(bridge, capsys):
    cast = bridge.cast
    cast.add_key(KEY_B, "acctB")
    cast.set_credits("acct", 0)
    cast.set_credits("acctB", 100)
    cast.set_sender_ids("acct", [{"sender_id": "CASTDEMO", "label": "main", "channel": "sms"}])
    cast.set_sender_ids("acctB", [{"sender_id": "OTHER", "label": "b", "channel": "sms"}])
    locations = {"loc2": {"api_key": KEY_B, "account": "shop-b", "sender_id": "SHOPB"}}
    await bridge.start({"cast": {"sender_id": "CASTDEMO", "locations": locations}})
    await bridge.install("loc1")
    await bridge.install("loc2")
    await post_many(bridge, 2, "loc1", "a")
    await bridge.post_message(messageId="long", message="x" * 200)
    sent_b = await post_many(bridge, 2, "loc2", "b")
    await wait_for(lambda: finals(bridge, sent_b)["delivered"] == 2, timeout=20)
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    path = bridge.config_dir.config_path

    code, out = await run_cli(capsys, "--config", path, "accounts", "--json")
    assert code == 0
    main_name = bridge.daemon.cast.account_for("loc1").name
    rows = {row["account"]: row for row in json.loads(out)["accounts"]}
    main, b = rows[main_name], rows["shop-b"]
    assert main["state"] == "paused" and main["reason"] == "INSUFFICIENT_CREDITS"
    assert main["paused_since"].endswith("Z") and main["sandbox"] is True
    assert (main["credits"], main["credits_needed"], main["waiting"]) == (0, 4, 3)
    assert main["credits_read_at"].endswith("Z")
    assert main["locations"] == ["loc1"]
    assert main["sender_ids"] == [{"sender_id": "CASTDEMO", "approved": True}]
    assert b["state"] == "ok" and b["reason"] is None and b["sandbox"] is False
    assert (b["credits"], b["waiting"], b["sends_last_hour"]) == (98, 0, 2)
    assert b["locations"] == ["loc2"]
    assert b["sender_ids"] == [{"sender_id": "SHOPB", "approved": False}]

    code, out = await run_cli(capsys, "--config", path, "accounts")
    assert code == 0
    assert f"{main_name} (sandbox key): paused: INSUFFICIENT_CREDITS since " in out
    assert "  credits 0 (read " in out and "needed by waiting messages 4" in out
    assert "shop-b: ok" in out and "sender ID SHOPB: NOT approved" in out
    assert "cast_test_key" not in out and KEY_B not in out


def test_accounts_without_a_daemon_says_so(config_dir, capsys):
    assert cli.main(["--config", config_dir.write(), "accounts"]) == cli.EXIT_TEMPFAIL
    assert "no running castghld answers" in capsys.readouterr().err


@pytest.mark.gen_test(timeout=60)
async def test_accounts_counts_a_waiting_text_with_a_lone_surrogate(bridge, capsys):
    # GHL's JSON may carry "\ud800" (a lone surrogate): the parts count must not raise, or
    # `castghld accounts` fails for every account while that message waits.
    bridge.cast.set_credits("acct", 0)
    await bridge.start()
    await bridge.install("loc1")
    await bridge.post_message(messageId="odd", message="\ud800 hello")
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    code, out = await run_cli(
        capsys, "--config", bridge.config_dir.config_path, "accounts", "--json"
    )
    assert code == 0
    [row] = json.loads(out)["accounts"]
    assert (row["credits_needed"], row["waiting"]) == (1, 1)

"""The rebilling ledger (castghld.usage) and `castghld usage`: counts per location and day, read
through the running daemon's admin socket and from a stopped daemon's state file."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from castghld import cli
from castghld.fakes import wait_for
from castghld.state import StateStore
from castghld.usage import RETENTION_DAYS, SECTION, UsageLedger, days_before, today

LONG = "x" * 200  # two parts of 160 GSM-7 characters at the fake Cast


def statuses(ghl, message_id: str) -> list[str]:
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


async def cli_in_thread(capsys, *argv) -> tuple[int, str, str]:
    """`castghld ...` on a thread: the daemon it talks to serves on this test's loop."""
    code = await asyncio.get_running_loop().run_in_executor(None, cli.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def traffic(bridge) -> None:
    """loc1: one delivered message, one of two parts undelivered, one never sent (invalid
    number), one reply."""
    bridge.cast.set_delivery("+639170000002", "undelivered")
    await bridge.post_message(messageId="m1", phone="+639170000001", message="hello")
    await bridge.post_message(messageId="m2", phone="+639170000002", message=LONG)
    await bridge.post_message(messageId="m3", phone="12")
    reply = {
        "message_id": "CASTREPLY1",
        "from": "09181234567",
        "to": "09171234567",
        "message": "thanks",
        "received_at": "2026-12-01T01:00:00Z",
    }
    await bridge.cast.post_inbound(
        bridge.daemon.url + "/api/cast/v1/webhook/inbound", "inbound-secret", reply
    )
    await wait_for(lambda: statuses(bridge.ghl, "m1") == ["pending", "delivered"])
    await wait_for(lambda: statuses(bridge.ghl, "m2") == ["pending", "failed"])
    await wait_for(lambda: statuses(bridge.ghl, "m3") == ["failed"])
    await wait_for(lambda: bridge.ghl.inbound_messages)
    await wait_for(lambda: not bridge.daemon.outbox.records)


EXPECTED = {"sent": 2, "parts": 3, "delivered": 1, "undelivered": 1, "failed": 1, "replies": 1}


@pytest.mark.gen_test(timeout=30)
async def test_usage_counts_sends_parts_outcomes_and_replies_per_location_and_day(bridge, capsys):
    await bridge.start()
    await bridge.install("loc1")
    await traffic(bridge)
    path = bridge.config_dir.config_path
    code, out, err = await cli_in_thread(capsys, "--config", path, "usage", "--json")
    assert code == 0, err
    doc = json.loads(out)
    [row] = doc["rows"]
    account = bridge.daemon.cast.account_for("loc1").name
    assert row == {"date": today(), "location_id": "loc1", "account": account, **EXPECTED}
    assert doc["totals"] == EXPECTED
    for secret in ("+639170000001", "9170000002", "hello", "thanks", "cast_test_key"):
        assert secret not in out


@pytest.mark.gen_test(timeout=30)
async def test_usage_of_a_stopped_daemon_is_read_from_its_state_file(bridge, capsys):
    await bridge.start()
    await bridge.install("loc1")
    await traffic(bridge)
    await bridge.stop()  # the counts not flushed yet are written by the stop
    path = bridge.config_dir.config_path
    code, out, err = await cli_in_thread(
        capsys, "--config", path, "usage", "--csv", "--location", "loc1"
    )
    assert code == 0, err
    header, line = out.strip().splitlines()
    assert header == "date,location_id,account,sent,parts,delivered,undelivered,failed,replies"
    assert line.startswith(f"{today()},loc1,acct-") and line.endswith(",2,3,1,1,1,1")
    code, out, _ = await cli_in_thread(capsys, "--config", path, "usage", "--location", "other")
    assert code == 0 and "from the state file" in out and "loc1" not in out


def test_usage_refuses_a_date_that_is_not_one(config_dir, capsys):
    path = config_dir.write()
    assert cli.main(["--config", path, "usage", "--from", "yesterday"]) == 2
    assert "'yesterday' is not a date like 2026-12-31" in capsys.readouterr().err


@pytest.mark.gen_test
async def test_ledger_flushes_in_one_commit_and_drops_rows_past_retention(config_dir):
    config = config_dir.load()
    from castghld.keyring import KeyRing

    state = StateStore(config.state.dir, KeyRing.load(config.state.key_file))
    state.load()
    old = days_before(today(), RETENTION_DAYS + 1)
    kept = days_before(today(), RETENTION_DAYS - 1)
    state.put(SECTION, f"{old}|loc1|acct-1", [1, 1, 1, 0, 0, 0])
    state.put(SECTION, f"{kept}|loc1|acct-1", [1, 1, 1, 0, 0, 0])
    await state.commit()
    ledger = UsageLedger(state)
    writes = state.write_count
    for _ in range(100):
        ledger.count_sent("loc1", "acct-1", 2, time.time())
    ledger.count_outcome("loc1", "acct-1", "delivered", time.time())
    ledger.count_reply("loc2", "acct-1")
    await ledger.flush()
    assert state.write_count == writes + 1
    assert state.get(SECTION, f"{today()}|loc1|acct-1") == [100, 200, 1, 0, 0, 0]
    assert state.get(SECTION, f"{today()}|loc2|acct-1") == [0, 0, 0, 0, 0, 1]
    assert state.get(SECTION, f"{old}|loc1|acct-1") is None
    assert state.get(SECTION, f"{kept}|loc1|acct-1") == [1, 1, 1, 0, 0, 0]
    state.close()
    reread = StateStore(config.state.dir, KeyRing.load(config.state.key_file))
    reread.load()
    assert reread.get(SECTION, f"{today()}|loc1|acct-1") == [100, 200, 1, 0, 0, 0]
    reread.close()


@pytest.mark.gen_test(timeout=40)
async def test_usage_check_agrees_with_cast_usage_parts_included(bridge, capsys):
    bridge.cast.today = today  # Cast's days are Manila days, like the ledger's
    bridge.cast.add_key("cast_loc2_key", "acct2")
    await bridge.start({"cast": {"locations": {"loc2": {"api_key": "cast_loc2_key"}}}})
    await bridge.install("loc1")
    await bridge.install("loc2")
    sends = {"a": ("loc1", "hi"), "b": ("loc1", "z" * 400), "c": ("loc2", "Salamat 😀 " * 10)}
    for message_id, (location_id, text) in sends.items():
        await bridge.post_message(messageId=message_id, locationId=location_id, message=text)
    for message_id in sends:
        await wait_for(lambda m=message_id: "delivered" in statuses(bridge.ghl, m), timeout=10)
    path = bridge.config_dir.config_path
    code, out, err = await cli_in_thread(capsys, "--config", path, "usage", "--check")
    assert code == 0, out + err
    assert "Cast's usage agrees with castghld's ledger" in out
    accounts = {loc: bridge.daemon.cast.account_for(loc).name for loc in ("loc1", "loc2")}
    code, out, _ = await cli_in_thread(capsys, "--config", path, "usage", "--check", "--json")
    check = {row["account"]: row for row in json.loads(out)["check"]}
    parts = sum(s["parts"] for s in bridge.cast.sent if s["account"] == "acct")
    assert check[accounts["loc1"]]["our_parts"] == check[accounts["loc1"]]["cast_parts"] == parts
    assert check[accounts["loc2"]]["cast_messages"] == check[accounts["loc2"]]["our_sent"] == 1
    # A message sent on the account by something other than castghld shows up as a difference.
    bridge.cast.send_outside("acct", "+639170000009", "sent from elsewhere")
    code, out, _ = await cli_in_thread(capsys, "--config", path, "usage", "--check")
    assert code == 1
    assert "differs: Cast +1 message(s), +1 part(s)" in out and "1 day(s) differ" in out

"""Cast credits (castghld.credits): each account's balance and the parts its waiting messages
need, as metrics, read from the fake Cast over HTTP."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from castghld.fakes import wait_for
from castghld.outbound import SENDERS_PER_ACCOUNT
from castghld.parts import message_parts
from tests.conftest import merge


async def gauge(daemon, name: str, account: str) -> float | None:
    response = await AsyncHTTPClient().fetch(daemon.url + "/metrics")
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("account") == account:
                return sample.value
    return None


def statuses(ghl, message_id: str) -> list[str]:
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


@pytest.mark.gen_test(timeout=30)
async def test_credits_are_read_at_start_and_every_balance_interval(bridge):
    bridge.cast.set_credits("acct", 500)
    daemon = await bridge.start({"cast": {"balance_interval": "1s"}})
    account = daemon.cast.account_for("loc1").name
    await wait_for(lambda: daemon.credits.balances.balances.get(account, (0,))[0] == 500)
    assert await gauge(daemon, "castghld_cast_credits", account) == 500
    assert await gauge(daemon, "castghld_cast_postpaid", account) == 0
    bridge.cast.top_up("acct", 1000)
    await wait_for(lambda: daemon.credits.balances.balances[account][0] == 1500, timeout=5)
    assert await gauge(daemon, "castghld_cast_credits", account) == 1500
    assert await gauge(daemon, "castghld_cast_credits_read_timestamp_seconds", account) > 0


@pytest.mark.gen_test(timeout=30)
async def test_postpaid_accounts_export_negative_credits_and_their_billing_type(bridge):
    bridge.cast.set_credits("acct", -40, billing_type="postpaid", credit_limit=1000)
    daemon = await bridge.start()
    account = daemon.cast.account_for("loc1").name
    await wait_for(lambda: account in daemon.credits.balances.balances)
    assert await gauge(daemon, "castghld_cast_credits", account) == -40
    assert await gauge(daemon, "castghld_cast_postpaid", account) == 1


@pytest.mark.gen_test(timeout=30)
async def test_a_sandbox_key_is_named_as_such_in_the_log(bridge, caplog):
    caplog.set_level(logging.INFO, "castghld.credits")
    daemon = await bridge.start()  # the tests' key is cast_test_key
    account = daemon.cast.account_for("loc1").name
    await wait_for(lambda: account in daemon.credits.balances.balances)
    lines = [r.getMessage() for r in caplog.records if r.name == "castghld.credits"]
    assert any(f"{account} (cast.api_key) uses a sandbox key" in line for line in lines)
    assert any(line.startswith(f"Cast account {account} (sandbox key): ") for line in lines)
    assert not any("cast_test_key" in line for line in lines)


@pytest.mark.gen_test(timeout=30)
async def test_credits_needed_counts_the_parts_of_waiting_messages_as_cast_does(bridge):
    daemon = await bridge.start()
    await bridge.install("loc1")
    account = daemon.cast.account_for("loc1").name
    bridge.cast.hang("send")  # the first send hangs; the rest wait behind it in the lane
    texts = {
        "a": ("hello", ()),  # 1 part
        "b": ("x" * 200, ()),  # GSM-7 over 160: 2 parts of 153
        "c": ("see the photo", ("https://example.com/" + "p" * 150,)),  # the link makes 2
        "d": ("Salamat po! 😀 " * 6, ()),  # UCS-2 over 70: 2 parts of 67
    }
    for message_id, (text, attachments) in texts.items():
        await bridge.post_message(messageId=message_id, message=text, attachments=list(attachments))
    expected = sum(message_parts("\n".join([t, *a])) for t, a in texts.values())
    assert expected == 7
    await wait_for(lambda: daemon.credits.waiting.needed(account) == expected)
    assert await gauge(daemon, "castghld_cast_credits_needed", account) == expected
    bridge.cast.release("send")
    for message_id in texts:
        await wait_for(lambda m=message_id: "delivered" in statuses(bridge.ghl, m), timeout=10)
    assert await gauge(daemon, "castghld_cast_credits_needed", account) == 0
    charged = await gauge(daemon, "castghld_cast_parts_charged_total", account)
    assert charged == expected == sum(s["parts"] for s in bridge.cast.sent)


@pytest.mark.gen_test(timeout=30)
async def test_messages_waiting_at_a_restart_are_counted_as_needed(bridge):
    daemon = await bridge.start()
    await bridge.install("loc1")
    bridge.cast.hang("send")
    # More than the account's send workers: the first ones hang at Cast, the rest are never
    # touched after the restart (their workers hang again), so only the count at start sees them.
    count = SENDERS_PER_ACCOUNT + 4
    for n in range(count):
        await bridge.post_message(messageId=f"m{n}", message="y" * 300)  # 2 parts each
    account = daemon.cast.account_for("loc1").name
    await wait_for(lambda: daemon.credits.waiting.needed(account) == 2 * count)
    await bridge.stop()
    bridge.cast.release("send")
    bridge.cast.hang("send")
    daemon = await bridge.start()
    await wait_for(lambda: daemon.credits.waiting.needed(account) == 2 * count)
    bridge.cast.release("send")
    await wait_for(lambda: daemon.credits.waiting.needed(account) == 0, timeout=10)


@pytest.mark.gen_test(timeout=30)
async def test_each_accounts_counters_exist_at_zero_from_the_start(bridge):
    bridge.cast.hang("balance")  # before the first balance read
    daemon = await bridge.start({"cast": {"locations": {"loc2": {"api_key": "cast_other"}}}})
    for location_id in ("loc1", "loc2"):
        account = daemon.cast.account_for(location_id).name
        assert await gauge(daemon, "castghld_cast_parts_charged_total", account) == 0
        assert await gauge(daemon, "castghld_cast_credits_needed", account) == 0
    bridge.cast.release("balance")


@pytest.mark.gen_test(timeout=30)
async def test_a_reload_applies_a_new_balance_interval_at_once(bridge):
    bridge.cast.set_credits("acct", 500)
    daemon = await bridge.start({"cast": {"balance_interval": "1h"}})
    account = daemon.cast.account_for("loc1").name
    await wait_for(lambda: account in daemon.credits.balances.balances)
    bridge.cast.top_up("acct", 1)
    bridge.config_dir.write(merge(bridge.extra, {"cast": {"balance_interval": "1s"}}))
    assert daemon.reload()
    await wait_for(lambda: daemon.credits.balances.balances[account][0] == 501, timeout=5)


@pytest.mark.gen_test(timeout=30)
async def test_a_text_with_a_lone_surrogate_is_acknowledged_and_counted(bridge):
    daemon = await bridge.start()
    await bridge.install("loc1")
    bridge.cast.hang("send")
    response = await bridge.post_message(messageId="odd", message="bad \ud800 half")
    assert response.code == 200
    account = daemon.cast.account_for("loc1").name
    assert daemon.credits.waiting.needed(account) == 1
    bridge.cast.release("send")


@pytest.mark.gen_test(timeout=30)
async def test_a_balance_cast_did_not_answer_is_logged_as_no_answer_not_599(bridge, caplog):
    """599 is the HTTP client's code for no answer, never Cast's: the line says what happened."""
    caplog.set_level(logging.INFO, "castghld.credits")
    bridge.cast.fail_next("balance", 599)  # the connection drops without an answer
    daemon = await bridge.start()
    account = daemon.cast.account_for("loc1").name

    def problem() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if r.name == "castghld.credits"]
        return [line for line in lines if "cannot read the balance" in line]

    [line] = await wait_for(problem)
    assert f"Cast account {account}" in line and "balance: no answer from Cast: " in line
    assert "599" not in line

"""Account-level Cast refusals pause the account, not the message (issue 17 item 1), against the
fake Cast's wallets and key switches over real HTTP, scaled down in time."""

from __future__ import annotations

import logging
import time
from collections import Counter

import pytest
from daemon_process import ServeProcess
from tornado.httpclient import AsyncHTTPClient

import castghld.accounts
from castghld.fakes import wait_for
from tests.test_outbound import statuses

DEFAULT_ACCOUNT = "acct"  # the fake's account of the default key


@pytest.fixture(autouse=True)
def quick_probes(monkeypatch):
    """Probes every 0.1-0.5 s instead of 2 s-3 min: the tests wait for seconds, not minutes."""
    monkeypatch.setattr(castghld.accounts, "PROBE_BACKOFF", (0.1, 0.5))


async def post_many(bridge, count: int, location: str = "loc1", prefix: str = "m") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(count)]
    for message_id in ids:
        response = await bridge.post_message(messageId=message_id, locationId=location)
        assert response.code == 200
    return ids


def finals(bridge, ids: list[str]) -> Counter:
    """How many of `ids` GHL shows delivered / failed (a final status reported)."""
    out: Counter = Counter()
    for message_id in ids:
        for status in statuses(bridge.ghl, message_id):
            if status in ("delivered", "failed"):
                out[status] += 1
    return out


def sends_per_message(bridge) -> Counter:
    """Cast sends by GHL message id (a new idempotency key after a cached refusal is ``id~rN``)."""
    return Counter(s["idempotency_key"].split("~r")[0] for s in bridge.cast.sent)


async def metrics_text(daemon) -> str:
    return (await AsyncHTTPClient().fetch(daemon.url + "/metrics")).body.decode()


@pytest.mark.parametrize("cache_refusals", [False, True])
@pytest.mark.gen_test(timeout=60)
async def test_credits_run_out_and_a_topup_resumes_with_nothing_failed(bridge, cache_refusals):
    bridge.cast.cache_refusals = cache_refusals
    bridge.cast.set_credits(DEFAULT_ACCOUNT, 5)
    await bridge.start()
    await bridge.install("loc1")
    ids = await post_many(bridge, 20)
    await wait_for(lambda: bridge.cast.refusals["INSUFFICIENT_CREDITS"] >= 1, timeout=10)
    await wait_for(lambda: bridge.cast.calls_to("GET", "/api/v1/account/balance"), timeout=10)
    refused_before_topup = bridge.cast.refusals["INSUFFICIENT_CREDITS"]
    bridge.cast.top_up(DEFAULT_ACCOUNT, 30)
    await wait_for(lambda: finals(bridge, ids)["delivered"] == 20, timeout=30)
    assert finals(bridge, ids) == {"delivered": 20}
    assert sends_per_message(bridge) == {message_id: 1 for message_id in ids}
    # A paused account sends nothing more: only the sends already on their way met the 402.
    assert refused_before_topup <= 8
    # Refusals replayed from Cast's idempotency cache made new keys, and only then.
    renamed = [s["idempotency_key"] for s in bridge.cast.sent if "~r" in s["idempotency_key"]]
    assert bool(renamed) == cache_refusals
    assert all(key.endswith("~r1") for key in renamed)
    assert bridge.daemon.outbound.accounts.paused == {}


@pytest.mark.gen_test(timeout=60)
async def test_without_a_topup_messages_fail_only_at_their_send_deadline_with_the_reason(bridge):
    bridge.cast.set_credits(DEFAULT_ACCOUNT, 0)
    await bridge.start({"delivery": {"send_deadline": "3s"}})
    await bridge.install("loc1")
    posted = time.time()
    ids = await post_many(bridge, 3)
    await wait_for(lambda: bridge.cast.refusals["INSUFFICIENT_CREDITS"] >= 1, timeout=10)
    await wait_for(lambda: finals(bridge, ids)["failed"] == 3, timeout=20)
    assert time.time() - posted >= 3.0
    for message_id in ids:
        [*_, report] = bridge.ghl.statuses[message_id]
        assert report["status"] == "failed"
        assert report["error"]["code"] == "INSUFFICIENT_CREDITS"
        text = report["error"]["message"]
        assert text.startswith("Cast account acct-") and " has no credits since " in text
    assert bridge.cast.sent == []
    # The paused account was never hammered: one refusal per send already on its way.
    assert bridge.cast.refusals["INSUFFICIENT_CREDITS"] <= 3


@pytest.mark.gen_test(timeout=60)
async def test_a_second_account_drains_at_its_full_rate_while_the_first_is_paused(bridge):
    bridge.cast.add_key("cast_live_b", "acctB")
    bridge.cast.set_credits(DEFAULT_ACCOUNT, 0)
    await bridge.start({"cast": {"locations": {"loc2": {"api_key": "cast_live_b"}}}})
    await bridge.install("loc1")
    await bridge.install("loc2")
    await post_many(bridge, 5, "loc1", "a")
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    ids = await post_many(bridge, 40, "loc2", "b")
    await wait_for(lambda: len(bridge.cast.sent) == 40, timeout=20)
    times = sorted(s["time"] for s in bridge.cast.sent)
    # 40 sends at 10/s: 10 per pacing window, about 4 s (slack for a loaded machine).
    assert times[-1] - times[0] < 6.0
    assert bridge.cast.max_sends_in_window(1.0, "acctB") >= 9
    await wait_for(lambda: finals(bridge, ids)["delivered"] == 40, timeout=20)
    assert list(bridge.daemon.outbound.accounts.paused) == [
        bridge.daemon.cast.account_for("loc1").name
    ]


@pytest.mark.gen_test(timeout=60)
async def test_a_pause_and_a_resume_are_one_log_line_each_and_a_gauge(bridge, caplog):
    caplog.set_level(logging.INFO, logger="castghld.accounts")
    bridge.cast.set_credits(DEFAULT_ACCOUNT, 0)
    await bridge.start()
    await bridge.install("loc1")
    name = bridge.daemon.cast.account_for("loc1").name
    ids = await post_many(bridge, 4)
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    gauge = f'castghld_cast_account_paused{{account="{name}",reason="INSUFFICIENT_CREDITS"}}'
    assert gauge + " 1.0" in await metrics_text(bridge.daemon)
    bridge.cast.top_up(DEFAULT_ACCOUNT, 10)
    await wait_for(lambda: finals(bridge, ids)["delivered"] == 4, timeout=20)
    assert gauge + " 0.0" in await metrics_text(bridge.daemon)
    lines = [r for r in caplog.records if r.name == "castghld.accounts"]
    paused, resumed = lines
    assert paused.levelno == logging.ERROR and resumed.levelno == logging.INFO
    text = paused.getMessage()
    assert text.startswith(f"Cast account {name} paused: 402 INSUFFICIENT_CREDITS")
    assert "message(s) wait" in text and "fix: top up the Cast account's credits" in text
    text = resumed.getMessage()
    assert text.startswith(f"Cast account {name} resumed after ")
    assert "INSUFFICIENT_CREDITS: credits 10;" in text and "message(s) waiting go out" in text
    assert "cast_test_key" not in text + paused.getMessage()


@pytest.mark.parametrize(
    ("switch", "fix", "code"),
    [
        (
            lambda c: c.deactivate(DEFAULT_ACCOUNT),
            lambda c: c.deactivate(DEFAULT_ACCOUNT, False),
            "USER_INACTIVE",
        ),
        (
            lambda c: c.refuse_ip(DEFAULT_ACCOUNT),
            lambda c: c.refuse_ip(DEFAULT_ACCOUNT, False),
            "IP_NOT_WHITELISTED",
        ),
        (
            lambda c: c.allow_channels(DEFAULT_ACCOUNT, ["otp"]),
            lambda c: c.allow_channels(DEFAULT_ACCOUNT, ["sms"]),
            "CHANNEL_NOT_ALLOWED",
        ),
        (
            lambda c: c.set_credits(DEFAULT_ACCOUNT, 0, "postpaid", 0),
            lambda c: c.set_credits(DEFAULT_ACCOUNT, 0, "postpaid", 100),
            "CREDIT_LIMIT_REACHED",
        ),
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_each_account_refusal_pauses_until_the_probe_shows_it_fixed(
    bridge, switch, fix, code
):
    switch(bridge.cast)
    await bridge.start()
    await bridge.install("loc1")
    ids = await post_many(bridge, 3)
    await wait_for(lambda: bridge.cast.refusals[code] >= 1, timeout=10)
    [pause] = bridge.daemon.outbound.accounts.paused.values()
    assert pause.code == code
    probes = len(bridge.cast.calls_to("GET", "/api/v1/account/"))
    await wait_for(lambda: len(bridge.cast.calls_to("GET", "/api/v1/account/")) > probes + 1)
    assert bridge.cast.sent == [] and finals(bridge, ids) == {}
    fix(bridge.cast)
    await wait_for(lambda: finals(bridge, ids)["delivered"] == 3, timeout=20)
    assert sends_per_message(bridge) == {message_id: 1 for message_id in ids}


@pytest.mark.parametrize(
    "credits", [10**400, "1e999x", [], None], ids=["huge", "str", "list", "null"]
)
@pytest.mark.gen_test(timeout=60)
async def test_a_balance_answer_that_is_no_number_does_not_end_the_probes(bridge, credits):
    # A hostile balance (an integer too large for a float, a string, a list) is no answer:
    # the probe goes on, and the top-up that follows resumes the account.
    bridge.cast.set_credits(DEFAULT_ACCOUNT, 0)
    await bridge.start()
    await bridge.install("loc1")
    bridge.cast.fail_next("balance", 200, body={"success": True, "credits": credits}, times=2)
    ids = await post_many(bridge, 3)
    await wait_for(lambda: len(bridge.cast.calls_to("GET", "/api/v1/account/balance")) >= 2)
    bridge.cast.top_up(DEFAULT_ACCOUNT, 10)
    await wait_for(lambda: finals(bridge, ids)["delivered"] == 3, timeout=30)
    assert sends_per_message(bridge) == {message_id: 1 for message_id in ids}


@pytest.mark.gen_test(timeout=90)
async def test_a_send_held_back_by_a_pause_keeps_its_unsent_mark(bridge):
    # A send held back at the instant of a pause (nothing left) still cannot have been sent:
    # after a 402 on its next attempt and a top-up, Cast's replayed refusal gives it a new
    # idempotency key instead of failing it.
    bridge.cast.cache_refusals = True
    bridge.cast.set_credits(DEFAULT_ACCOUNT, 0)
    # One send a second: the second message waits for its slot when the first's 402 pauses.
    await bridge.start({"cast": {"messages_per_second": 1}})
    await bridge.install("loc1")
    bridge.cast.latency = 1.0  # both messages are queued before the first 402 arrives
    ids = await post_many(bridge, 3)
    sends = "/api/v1/sms/send"
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    bridge.cast.latency = 0.0
    records = bridge.daemon.outbox.records
    await wait_for(lambda: sum(bool(r.get("attempted")) for r in records.values()) >= 2)
    await wait_for(lambda: len(bridge.cast.calls_to("GET", "/api/v1/account/balance")) >= 2)
    assert len(bridge.cast.calls_to("POST", sends)) == 1  # the second was held back
    # A probe reads credits that another sender spends before the account's next send.
    bridge.cast.fail_next("balance", 200, body={"success": True, "credits": 5})
    await wait_for(lambda: len(bridge.cast.calls_to("POST", sends)) >= 2, timeout=20)
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    bridge.cast.top_up(DEFAULT_ACCOUNT, 10)
    await wait_for(lambda: sum(finals(bridge, ids).values()) == 3, timeout=40)
    assert finals(bridge, ids) == {"delivered": 3}
    assert sends_per_message(bridge) == {message_id: 1 for message_id in ids}


@pytest.mark.gen_test(timeout=90)
async def test_kill9_while_a_new_idempotency_key_is_sent_sends_one_sms(
    config_dir, fake_ghl, fake_cast
):
    # Cast replays the 402 cached for the message's key after the top-up: it goes out under
    # ``~r1``; castghld dies while Cast takes that request. The restart resends ``~r1`` (Cast
    # replays its answer): one SMS, never under a third key.
    fake_cast.cache_refusals = True
    fake_cast.set_credits(DEFAULT_ACCOUNT, 0)
    serve = ServeProcess(config_dir, fake_ghl, fake_cast)
    try:
        await serve.start()
        await serve.install("loc1")
        assert (await serve.post_message("m-fresh")).code == 200
        await wait_for(lambda: fake_cast.refusals["INSUFFICIENT_CREDITS"] == 1, timeout=10)
        fake_cast.hang("send")
        fake_cast.top_up(DEFAULT_ACCOUNT, 5)
        await wait_for(lambda: fake_cast.hung("send") == 1, timeout=30)  # the same key again
        fake_cast.latency = 2.0  # the next request is at Cast, not answered yet, when we kill
        fake_cast.release("send")
        key = "X-Idempotency-Key"
        await wait_for(lambda: any(c.headers.get(key) == "m-fresh~r1" for c in fake_cast.calls))
        serve.kill9()
        await wait_for(lambda: fake_cast.sent, timeout=10)  # Cast took it; the answer is lost
        fake_cast.latency = 0.0
        await serve.start()
        await wait_for(lambda: "delivered" in statuses(fake_ghl, "m-fresh"), timeout=30)
        assert [s["idempotency_key"] for s in fake_cast.sent] == ["m-fresh~r1"]
        keys = {
            c.headers["X-Idempotency-Key"] for c in fake_cast.calls_to("POST", "/api/v1/sms/send")
        }
        assert keys == {"m-fresh", "m-fresh~r1"}
        assert await serve.terminate() == 0
    finally:
        serve.close()
    assert fake_cast.violations == []


@pytest.mark.gen_test(timeout=60)
async def test_a_profile_without_allowed_channels_lets_the_next_send_tell(bridge):
    # A profile that does not list the channels cannot show the fix: the account resumes and
    # its next send tells, as for a profile without ``is_active``.
    bridge.cast.allow_channels(DEFAULT_ACCOUNT, ["otp"])
    await bridge.start()
    await bridge.install("loc1")
    profile = {"success": True, "name": "acct", "credits": 100, "billing_type": "topup"}
    bridge.cast.fail_next("profile", 200, body=profile, times=100000)
    ids = await post_many(bridge, 3)
    await wait_for(lambda: bridge.cast.refusals["CHANNEL_NOT_ALLOWED"] >= 1, timeout=10)
    bridge.cast.allow_channels(DEFAULT_ACCOUNT, ["sms"])
    await wait_for(lambda: finals(bridge, ids)["delivered"] == 3, timeout=20)
    assert sends_per_message(bridge) == {message_id: 1 for message_id in ids}

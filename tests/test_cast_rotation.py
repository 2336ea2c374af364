"""A Cast account keeps its identity when its key is rotated (issue 16 item 6, issue 17 item 1):
messages in flight, paused state and receipts survive a reload or a restart with a new key."""

from __future__ import annotations

import pytest

import castghld.accounts
import castghld.outbound.sweep
from castghld.config import ConfigError
from castghld.fakes import wait_for
from tests.conftest import merge
from tests.test_account_pause import finals, post_many, sends_per_message
from tests.test_outbound import statuses

OLD, NEW = "cast_live_old_key", "cast_live_new_key"
ACCOUNT = "acct"  # the fake's account of both keys


def cast_config(key: str, named: bool | str) -> dict:
    """`named`: True for the name "main", a str for that name, False for none."""
    name = "main" if named is True else named
    return {"cast": {"api_key": key, **({"account": name} if name else {})}}


async def start(bridge, named: bool, extra: dict | None = None):
    bridge.cast.api_keys = {OLD: ACCOUNT}
    await bridge.start(merge(cast_config(OLD, named), extra or {}))
    await bridge.install("loc1")


def rotate(bridge, named: bool, extra: dict | None = None) -> None:
    """The README's rotation: Cast gives the account a second key, the config takes it, reload."""
    bridge.cast.add_key(NEW, ACCOUNT)
    config = merge(merge(bridge.extra, cast_config(NEW, named)), extra or {})
    bridge.config_dir.write(config)
    assert bridge.daemon.reload()


def keys_used(bridge, message_id: str) -> list[str]:
    calls = bridge.cast.calls_to("POST", "/api/v1/sms/send")
    return [c.headers["X-API-Key"] for c in calls if c.headers["X-Idempotency-Key"] == message_id]


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("cache_refusals", [False, True])
@pytest.mark.gen_test(timeout=60)
async def test_a_revoked_key_replaced_by_reload_resumes_at_once_with_nothing_failed(
    bridge, monkeypatch, named, cache_refusals
):
    # Probes so slow that only the reload can resume the account within the test.
    monkeypatch.setattr(castghld.accounts, "PROBE_BACKOFF", (60.0, 60.0))
    bridge.cast.cache_refusals = cache_refusals
    bridge.cast.idempotency_scope = "account"  # the harder case: the new key sees cached answers
    await start(bridge, named)
    bridge.cast.revoke_key(OLD)
    ids = await post_many(bridge, 10)
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    rotate(bridge, named)
    await wait_for(lambda: finals(bridge, ids)["delivered"] == 10, timeout=20)
    assert finals(bridge, ids) == {"delivered": 10}
    assert sends_per_message(bridge) == {message_id: 1 for message_id in ids}
    assert {s["api_key"] for s in bridge.cast.sent} == {NEW}
    assert bridge.daemon.outbound.accounts.paused == {}


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.gen_test(timeout=60)
async def test_a_retry_waiting_when_the_key_rotates_goes_out_with_the_key_it_was_tried_with(
    bridge, named
):
    await start(bridge, named)
    # No answer Cast is sure of: the attempt may have been sent under the old key's scope.
    bridge.cast.fail_next("send", 503, headers={"Retry-After": "2"})
    await bridge.post_message()
    await wait_for(lambda: bridge.cast.calls_to("POST", "/api/v1/sms/send"))
    rotate(bridge, named)
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=20)
    assert keys_used(bridge, "msg-1") == [OLD, OLD]


@pytest.mark.parametrize("lookup_scope", ["account", "key"])
@pytest.mark.parametrize("named", [True, False])
@pytest.mark.gen_test(timeout=60)
async def test_a_message_waiting_for_its_receipt_is_looked_up_after_the_key_rotates(
    bridge, named, lookup_scope
):
    bridge.cast.lookup_scope = lookup_scope
    bridge.cast.delivery_delay = 1.5
    polls = {"delivery": {"status_polls": [0.2, 1, 2, 3]}}
    await start(bridge, named, polls)
    await bridge.post_message()
    await wait_for(lambda: bridge.cast.status_polls, timeout=10)  # polled once: "sent"
    rotate(bridge, named, polls)  # the reloaded config keeps the schedule (a reload applies it)
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=20)


@pytest.mark.gen_test(timeout=60)
async def test_a_replaced_key_that_cast_revoked_fails_a_message_that_may_have_been_sent(bridge):
    await start(bridge, named=True)
    bridge.cast.fail_next("send", 503, headers={"Retry-After": "2"})
    await bridge.post_message()
    await wait_for(lambda: bridge.cast.calls_to("POST", "/api/v1/sms/send"))
    rotate(bridge, named=True)
    bridge.cast.revoke_key(OLD)
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["failed"], timeout=20)
    error = bridge.ghl.statuses["msg-1"][0]["error"]
    assert error["code"] == "OUTCOME_UNKNOWN"
    assert "may have been sent" in error["message"]
    assert bridge.cast.sent == []
    assert bridge.daemon.outbound.accounts.paused == {}


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((OLD, True), (NEW, True)),  # a named account's key replaced while castghld was down
        ((OLD, False), (OLD, True)),  # an account named after messages were journaled
        ((OLD, True), (OLD, "renamed")),  # an account renamed, its key kept
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_a_message_refused_before_a_restart_goes_out_after_it(bridge, before, after):
    bridge.cast.set_credits(ACCOUNT, 0)
    await start(bridge, named=before[1])
    bridge.cast.api_keys[before[0]] = ACCOUNT
    await bridge.post_message()
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused, timeout=10)
    await bridge.stop()
    bridge.cast.add_key(after[0], ACCOUNT)
    bridge.cast.top_up(ACCOUNT, 5)
    await bridge.start(cast_config(*after))
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=20)
    assert keys_used(bridge, "msg-1")[-1] == after[0]
    assert len(bridge.cast.sent) == 1


@pytest.mark.parametrize(
    ("cast", "problem"),
    [
        ({"account": "acct-0123456789"}, "cast.account: 'acct-0123456789' must be"),
        ({"account": "has space"}, "cast.account: 'has space' must be"),
        (
            {"account": "main", "locations": {"loc2": {"api_key": "other", "account": "main"}}},
            "cast.locations.loc2.account: 'main' is also the account of cast's other key",
        ),
        (
            {"locations": {"loc2": {"api_key": "cast_test_key", "account": "two"}}},
            "cast.locations.loc2.account: the same api_key as cast under another name",
        ),
        (
            {"locations": {"loc2": {"account": "two"}}},
            "cast.locations.loc2.account: names the Cast account of this entry's api_key",
        ),
    ],
)
def test_account_names_are_checked(config_dir, cast, problem):
    with pytest.raises(ConfigError) as e:
        config_dir.load({"cast": cast})
    assert any(problem in p for p in e.value.problems), e.value.problems


@pytest.mark.gen_test(timeout=60)
async def test_receipt_sweeps_running_when_the_key_rotates_use_the_new_key(bridge, monkeypatch):
    # A campaign keeps its account's sweep running through the rotation; Cast then revokes
    # the old key. The sweep must read the logs with the key the account has now.
    monkeypatch.setattr(castghld.outbound.sweep, "CADENCE", ((120.0, 0.1), (900.0, 0.1)))
    bridge.cast.delivery_delay = 4.0
    bridge.cast.logs_enabled = True
    await start(bridge, named=True)
    await bridge.post_message()
    await wait_for(lambda: bridge.cast.calls_to("GET", "/api/v1/sms/logs"), timeout=10)
    rotate(bridge, named=True)
    bridge.cast.revoke_key(OLD)
    await wait_for(lambda: statuses(bridge.ghl, "msg-1")[-1:] == ["delivered"], timeout=20)


@pytest.mark.parametrize("cache_refusals", [False, True])
@pytest.mark.parametrize("named", [True, False])
@pytest.mark.gen_test(timeout=60)
async def test_a_first_attempt_refused_for_the_replaced_key_goes_out_with_the_new_key(
    bridge, named, cache_refusals
):
    # The first attempt is at Cast with the old key when the reload replaces it and Cast
    # revokes it: Cast's 403 says nothing was sent, so the message goes out with the new key
    # (under a new idempotency key if the new key sees the old one's cached refusal).
    bridge.cast.cache_refusals = cache_refusals
    bridge.cast.idempotency_scope = "account"
    await start(bridge, named)
    bridge.cast.hang("send")
    await bridge.post_message()
    await wait_for(lambda: bridge.cast.hung("send") == 1)
    rotate(bridge, named)
    bridge.cast.revoke_key(OLD)
    bridge.cast.release("send")
    await wait_for(lambda: statuses(bridge.ghl, "msg-1")[-1:] in (["delivered"], ["failed"]))
    assert statuses(bridge.ghl, "msg-1") == ["pending", "delivered"]
    assert [s["api_key"] for s in bridge.cast.sent] == [NEW]
    assert sends_per_message(bridge) == {"msg-1": 1}

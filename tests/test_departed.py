"""A location that left (UNINSTALL, `castghld forget`, marked uninstalled by reconciliation) is
not texted for again, and no reply is given to another location in its place (issue 16 §2-3)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_agency import agency_installed, reconciled
from test_inbound import post as post_reply
from test_inbound import reply
from test_oauth import app_event, post_app_webhook

from castghld.cli import main
from castghld.fakes import wait_for

# One Cast request at a time: while the fake Cast holds a send, the others wait for it.
ONE_AT_A_TIME = {"delivery": {"concurrency": 1}}


def dropped(bridge, reason: str = "location_uninstalled", stage: str = "unsent") -> float:
    value = bridge.daemon.metrics.registry.get_sample_value(
        "castghld_outbound_dropped_total", {"reason": reason, "stage": stage}
    )
    return value or 0.0


def status_reports(bridge, message_id: str) -> list:
    return bridge.ghl.calls_to("PUT", f"/conversations/messages/{message_id}/status")


async def uninstall(bridge, location_id: str) -> None:
    response = await post_app_webhook(bridge, app_event("UNINSTALL", location_id))
    assert response.code == 200
    assert bridge.daemon.installations.get(location_id) is None


# -- §2: outbound messages of a location that left ------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_texts_queued_when_a_location_uninstalls_are_dropped_not_sent(bridge):
    await bridge.start(ONE_AT_A_TIME)
    await bridge.install("loc1")
    bridge.cast.hang("send")  # the first send is in flight, the other five wait behind it
    for n in range(6):
        assert (await bridge.post_message(messageId=f"m{n}")).code == 200
    await wait_for(lambda: bridge.cast.hung("send") == 1)
    await uninstall(bridge, "loc1")
    bridge.cast.release("send")
    await wait_for(lambda: not bridge.daemon.outbox.records)
    # The send in flight at the UNINSTALL completes (Cast had it); nothing leaves after it.
    assert len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) == 1
    assert dropped(bridge) == 5
    # No GHL report for any of them: the location has no token any more.
    assert all(status_reports(bridge, f"m{n}") == [] for n in range(6))


@pytest.mark.gen_test(timeout=30)
async def test_dropped_texts_are_not_resurrected_by_a_restart(bridge):
    await bridge.start(ONE_AT_A_TIME)
    await bridge.install("loc1")
    bridge.cast.hang("send")
    for n in range(4):
        assert (await bridge.post_message(messageId=f"m{n}")).code == 200
    await wait_for(lambda: bridge.cast.hung("send") == 1)
    await uninstall(bridge, "loc1")
    bridge.cast.release("send")
    await wait_for(lambda: not bridge.daemon.outbox.records)
    sends = len(bridge.cast.calls_to("POST", "/api/v1/sms/send"))
    await bridge.stop()
    await bridge.start()
    assert not bridge.daemon.outbox.records
    await bridge.install("loc1")  # back, but its old texts stay dropped
    await bridge.daemon.outbox.wait_idle()
    assert len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) == sends == 1


@pytest.mark.gen_test(timeout=30)
async def test_forget_drops_the_waiting_texts_of_the_location_only(bridge):
    await bridge.start(ONE_AT_A_TIME)
    await bridge.install("loc1")
    await bridge.install("loc2")
    bridge.cast.hang("send")
    for n in range(3):
        assert (await bridge.post_message(messageId=f"a{n}", locationId="loc1")).code == 200
    await wait_for(lambda: bridge.cast.hung("send") == 1)
    # Behind the hung send in the same Cast account's lane, but loc2 stays installed.
    assert (await bridge.post_message(messageId="b0", locationId="loc2")).code == 200
    code = await asyncio.to_thread(
        main, ["--config", bridge.config_dir.config_path, "forget", "loc1"]
    )
    assert code == 0
    bridge.cast.release("send")
    await wait_for(lambda: not bridge.daemon.outbox.records)
    calls = bridge.cast.calls_to("POST", "/api/v1/sms/send")
    assert sorted(c.headers["X-Idempotency-Key"] for c in calls) == ["a0", "b0"]
    assert dropped(bridge) == 2


@pytest.mark.gen_test(timeout=30)
async def test_text_waiting_for_a_send_retry_is_dropped_at_the_uninstall(bridge):
    await bridge.start()
    await bridge.install("loc1")
    bridge.cast.fail_next("send", 503, headers={"Retry-After": "60"})
    assert (await bridge.post_message(messageId="m1")).code == 200
    await wait_for(lambda: bridge.daemon.outbox.records.get("out:m1", {}).get("tries") == 1)
    await uninstall(bridge, "loc1")
    await wait_for(lambda: not bridge.daemon.outbox.records)  # not 60 s later
    assert dropped(bridge) == 1
    assert len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) == 1
    assert status_reports(bridge, "m1") == []


@pytest.mark.gen_test(timeout=30)
async def test_texts_of_a_location_marked_uninstalled_by_reconciliation_are_dropped(bridge):
    await agency_installed(bridge, ["locA", "locB"])
    bridge.cast.fail_next("send", 503, headers={"Retry-After": "60"})
    assert (await bridge.post_message(messageId="m1", locationId="locB")).code == 200
    await wait_for(lambda: bridge.daemon.outbox.records.get("out:m1", {}).get("tries") == 1)
    bridge.ghl.uninstall_app("locB")  # the UNINSTALL webhook went nowhere
    installations = bridge.daemon.installations
    for _ in range(3):  # as many reads as reconciliation needs to be sure
        await reconciled(bridge)
        await installations.reconcile()
        if installations.get("locB") is None:
            break
    assert installations.get("locB") is None
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert dropped(bridge) == 1
    assert len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) == 1


@pytest.mark.gen_test(timeout=30)
async def test_sent_text_waiting_for_its_receipt_finishes_without_report(bridge):
    await bridge.start({"delivery": {"status_polls": [600]}})
    await bridge.install("loc1")
    assert (await bridge.post_message(messageId="m1")).code == 200
    await wait_for(lambda: bridge.daemon.outbox.records.get("out:m1", {}).get("stage") == "polling")
    reports = len(status_reports(bridge, "m1"))  # `pending`
    await uninstall(bridge, "loc1")
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert len(status_reports(bridge, "m1")) == reports
    assert dropped(bridge, stage="sent") == 1
    await bridge.stop()
    await bridge.start()
    assert not bridge.daemon.outbox.records


# -- §3: replies of a location that left ----------------------------------------------------------


async def kept_unrouted(bridge) -> None:
    """Every inbound record was tried and waits (none delivered)."""
    outbox = bridge.daemon.outbox
    await wait_for(lambda: outbox.records and outbox.running == 0)
    assert bridge.ghl.inbound_messages == []


@pytest.mark.gen_test(timeout=30)
async def test_reply_kept_with_two_locations_is_not_given_to_the_remaining_one(bridge):
    await bridge.start()
    await bridge.install("locA")
    await bridge.install("locB")
    assert (await post_reply(bridge, reply("OLD"))).code == 200
    await kept_unrouted(bridge)
    await uninstall(bridge, "locB")
    await bridge.stop()
    await bridge.start()
    await kept_unrouted(bridge)
    assert list(bridge.daemon.outbox.records) == ["in:OLD"]


@pytest.mark.gen_test(timeout=30)
async def test_new_reply_after_another_location_left_is_not_given_to_the_remaining_one(bridge):
    await bridge.start()
    await bridge.install("locA")
    await bridge.install("locB")
    await uninstall(bridge, "locB")
    assert (await post_reply(bridge, reply("NEW"))).code == 200
    await kept_unrouted(bridge)
    unrouted = bridge.daemon.metrics.registry.get_sample_value(
        "castghld_inbound_messages_total", {"stage": "delivery", "outcome": "unrouted"}
    )
    assert unrouted == 1


@pytest.mark.gen_test(timeout=30)
async def test_reply_of_a_location_that_left_expires_after_inbound_max_age(bridge):
    await bridge.start({"delivery": {"inbound_max_age": 1}})
    await bridge.install("locA")
    await bridge.install("locB")
    assert (await post_reply(bridge, reply("OLD"))).code == 200
    await kept_unrouted(bridge)
    await uninstall(bridge, "locB")
    accepted_at = bridge.daemon.outbox.records["in:OLD"]["accepted_at"]
    await wait_for(lambda: time.time() - accepted_at > 1.0, timeout=5)
    await bridge.stop()
    await bridge.start({"delivery": {"inbound_max_age": 1}})
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert bridge.ghl.inbound_messages == []
    expired = bridge.daemon.metrics.registry.get_sample_value(
        "castghld_inbound_messages_total", {"stage": "delivery", "outcome": "expired"}
    )
    assert expired == 1


@pytest.mark.gen_test(timeout=30)
async def test_texts_waiting_on_a_paused_account_are_dropped_at_the_uninstall(bridge):
    bridge.cast.set_credits("acct", 0)
    await bridge.start()
    await bridge.install("loc1")
    for n in range(4):
        assert (await bridge.post_message(messageId=f"m{n}")).code == 200
    await wait_for(lambda: bridge.daemon.outbound.accounts.paused)
    await uninstall(bridge, "loc1")
    await wait_for(lambda: not bridge.daemon.outbox.records)
    bridge.cast.top_up("acct", 10)  # the account resumes: nothing of the location leaves
    await wait_for(lambda: not bridge.daemon.outbound.accounts.paused, timeout=10)
    assert bridge.cast.sent == []
    assert dropped(bridge) == 4

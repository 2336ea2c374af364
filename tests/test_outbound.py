"""Outbound SMS end to end: signed webhook -> outbox -> fake Cast -> status reports to fake GHL."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import pytest

from castghld.cast import PROVIDER_ERROR_RETRIES, WINDOW, CastAccount
from castghld.fakes import wait_for
from castghld.outbound import POLL_WORKERS, REPORT_WORKERS, SENDERS_PER_ACCOUNT

SEND = "/api/v1/sms/send"


def body_of(response) -> dict:
    return json.loads(response.body)


def statuses(ghl, message_id: str) -> list[str]:
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


async def ready(bridge, extra: dict | None = None, locations=("loc1",)):
    await bridge.start(extra)
    for location_id in locations:
        await bridge.install(location_id)
    return bridge.daemon


@pytest.mark.gen_test(timeout=20)
async def test_webhook_sends_one_sms_and_reports_pending_then_delivered(bridge):
    await ready(bridge, {"cast": {"sender_id": "CASTDEMO"}})
    response = await bridge.post_message(phone="09171234567", message="Your code is 1234")
    assert response.code == 200
    assert body_of(response) == {"status": "accepted", "messageId": "msg-1"}
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"])
    [sent] = bridge.cast.sent
    assert sent["to"] == "+639171234567"
    assert sent["message"] == "Your code is 1234"
    assert sent["sender_id"] == "CASTDEMO"
    assert sent["idempotency_key"] == "msg-1"
    await wait_for(lambda: not bridge.daemon.outbox.records)


@pytest.mark.gen_test(timeout=20)
async def test_attachments_are_appended_as_links(bridge):
    await ready(bridge)
    await bridge.post_message(message="See", attachments=["https://x.example/a.png"])
    await wait_for(lambda: bridge.cast.sent)
    assert bridge.cast.sent[0]["message"] == "See\nhttps://x.example/a.png"


@pytest.mark.gen_test(timeout=20)
async def test_ack_is_fast_while_cast_hangs(bridge):
    await ready(bridge)
    bridge.cast.hang("send")
    started = time.monotonic()
    response = await bridge.post_message()
    elapsed = time.monotonic() - started
    assert response.code == 200
    assert elapsed < 0.1, f"ack took {elapsed * 1000:.0f} ms"
    await wait_for(lambda: bridge.cast.hung("send") == 1)
    bridge.cast.release("send")
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"])


@pytest.mark.gen_test(timeout=20)
async def test_duplicate_webhook_sends_one_sms(bridge):
    await ready(bridge)
    answers = [body_of(await bridge.post_message())["status"] for _ in range(3)]
    assert answers[0] == "accepted"
    assert answers[1:] == ["duplicate", "duplicate"]
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"])
    response = await bridge.post_message()  # a late GHL retry, after the message finished
    assert body_of(response)["status"] == "duplicate"
    assert len(bridge.cast.sent) == 1
    assert len(bridge.cast.calls_to("POST", SEND)) == 1


@pytest.mark.gen_test(timeout=20)
async def test_cast_429_is_retried_after_retry_after_with_same_key(bridge):
    await ready(bridge)
    bridge.cast.fail_next("send", 429, headers={"Retry-After": "1"})
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=10)
    first, second = bridge.cast.calls_to("POST", SEND)
    assert second.time - first.time >= 1.0
    assert first.headers["X-Idempotency-Key"] == second.headers["X-Idempotency-Key"] == "msg-1"
    assert len(bridge.cast.sent) == 1


@pytest.mark.parametrize("status", [503, 500])
@pytest.mark.gen_test(timeout=20)
async def test_cast_server_errors_are_retried(bridge, status):
    await ready(bridge, {"delivery": {"send_deadline": "30s"}})
    bridge.cast.fail_next("send", status)
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=10)
    assert len(bridge.cast.calls_to("POST", SEND)) == 2
    assert len(bridge.cast.sent) == 1


@pytest.mark.gen_test(timeout=30)
async def test_provider_error_is_retried_a_bounded_number_of_times(bridge):
    await ready(bridge, {"delivery": {"send_deadline": "1h"}})
    error = {"success": False, "error": "carrier rejected", "error_code": "PROVIDER_ERROR"}
    bridge.cast.fail_next("send", 502, error, times=100)
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["failed"], timeout=20)
    assert bridge.ghl.statuses["msg-1"][0]["error"]["code"] == "PROVIDER_ERROR"
    assert len(bridge.cast.calls_to("POST", SEND)) == 1 + PROVIDER_ERROR_RETRIES


@pytest.mark.gen_test(timeout=30)
async def test_send_deadline_is_checked_when_the_request_leaves(bridge):
    # Cast takes 1 message/s: of 6 messages accepted at once, those that cannot leave within
    # the 2 s deadline are reported expired instead of texted late.
    await ready(bridge, {"cast": {"messages_per_second": 1}, "delivery": {"send_deadline": "2s"}})
    accepted = {}
    for n in range(6):
        accepted[f"m{n}"] = time.monotonic()
        assert (await bridge.post_message(messageId=f"m{n}", phone=f"+63917123{n:04d}")).code == 200
    await wait_for(
        lambda: all(statuses(bridge.ghl, m)[-1:] in (["delivered"], ["failed"]) for m in accepted),
        timeout=20,
    )
    sent = {s["idempotency_key"]: s["time"] for s in bridge.cast.sent}
    assert 1 <= len(sent) <= 4
    for message_id, at in sent.items():
        assert at - accepted[message_id] <= 2.0 + 0.1
    for message_id in set(accepted) - set(sent):
        assert bridge.ghl.statuses[message_id][-1]["error"]["code"] == "EXPIRED"
    assert len(bridge.cast.calls_to("POST", SEND)) == len(sent)


@pytest.mark.gen_test(timeout=30)
async def test_failed_status_polls_do_not_use_up_the_poll_schedule(bridge):
    # Three polls scheduled; Cast's status API fails four times in a row, then answers.
    await ready(bridge)
    bridge.cast.fail_next("sms_status", 503, times=4)
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=25)
    assert sum(bridge.cast.status_polls.values()) == 5


@pytest.mark.gen_test(timeout=20)
async def test_insufficient_credits_pauses_the_account_instead_of_failing_the_message(bridge):
    # Issue 17: a 402 is about the account; the message waits and goes out once Cast shows
    # credits (here the fake's account has no wallet: its balance reads unlimited credits).
    await ready(bridge)
    bridge.cast.fail_next(
        "send",
        402,
        {"success": False, "error": "Not enough credits", "error_code": "INSUFFICIENT_CREDITS"},
    )
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"])
    assert len(bridge.cast.calls_to("POST", SEND)) == 2
    [sent] = bridge.cast.sent
    assert sent["idempotency_key"] == "msg-1"
    assert bridge.cast.calls_to("GET", "/api/v1/account/balance")


@pytest.mark.parametrize(
    ("phone", "code"),
    [
        ("12345", "INVALID_NUMBER"),
        ("+14155550123", "REGION_NOT_ALLOWED"),
        ("+63 2 8527 8121", "NOT_MOBILE"),
        ("not a number", "INVALID_NUMBER"),
    ],
)
@pytest.mark.gen_test(timeout=20)
async def test_invalid_number_fails_without_cast_call(bridge, phone, code):
    await ready(bridge)
    response = await bridge.post_message(phone=phone)
    assert response.code == 200
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["failed"])
    assert bridge.ghl.statuses["msg-1"][0]["error"]["code"] == code
    assert bridge.cast.calls_to("POST", SEND) == []


@pytest.mark.gen_test(timeout=20)
async def test_overlong_and_empty_messages_fail_without_cast_call(bridge):
    await ready(bridge)
    await bridge.post_message(messageId="long", message="x" * 10_001)
    await bridge.post_message(messageId="empty", message="")
    await wait_for(lambda: statuses(bridge.ghl, "long") == ["failed"])
    await wait_for(lambda: statuses(bridge.ghl, "empty") == ["failed"])
    assert bridge.ghl.statuses["long"][0]["error"]["code"] == "MESSAGE_TOO_LONG"
    assert bridge.ghl.statuses["empty"][0]["error"]["code"] == "EMPTY_MESSAGE"
    assert bridge.cast.calls_to("POST", SEND) == []


@pytest.mark.gen_test(timeout=20)
async def test_undelivered_report_becomes_failed_with_carrier_reason(bridge):
    await ready(bridge)
    bridge.cast.set_delivery(
        "+639171234567", "undelivered", dlr_status="UNDELIV", error_message="Subscriber absent"
    )
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "failed"])
    error = bridge.ghl.statuses["msg-1"][1]["error"]
    assert error["code"] == "UNDELIV"
    assert error["message"] == "Subscriber absent"


@pytest.mark.gen_test(timeout=20)
async def test_no_delivery_report_leaves_pending_and_finishes(bridge):
    await ready(bridge)
    bridge.cast.set_delivery("+639171234567", "sent")
    await bridge.post_message()
    await wait_for(lambda: bridge.cast.sent)
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert statuses(bridge.ghl, "msg-1") == ["pending"]
    assert sum(bridge.cast.status_polls.values()) == 3


@pytest.mark.gen_test(timeout=30)
async def test_ghl_no_provider_403_is_retried_without_refresh(bridge):
    await ready(bridge)
    bridge.ghl.no_provider_for("msg-1", times=2)
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=20)
    assert len(bridge.ghl.calls_to("PUT", "/conversations/messages/msg-1/status")) == 4
    assert sum(bridge.ghl.refresh_count.values()) == 0


@pytest.mark.gen_test(timeout=20)
async def test_ghl_401_on_status_refreshes_once(bridge):
    await ready(bridge)
    bridge.ghl.expire_access_tokens("loc1")
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"])
    assert bridge.ghl.refresh_count["loc1"] == 1
    assert bridge.ghl.refresh_reuse == 0


@pytest.mark.gen_test(timeout=20)
async def test_unknown_location_is_acknowledged_and_not_sent(bridge):
    await ready(bridge)
    response = await bridge.post_message(locationId="someone-else")
    assert response.code == 200
    assert body_of(response)["status"] == "ignored"
    assert bridge.daemon.outbox.records == {}
    assert bridge.cast.calls_to("POST", SEND) == []


@pytest.mark.gen_test(timeout=20)
async def test_email_type_is_acknowledged_reported_failed_and_not_sent(bridge):
    await ready(bridge)
    response = await bridge.post_message(type="Email")
    assert response.code == 200
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["failed"])
    assert bridge.ghl.statuses["msg-1"][0]["error"]["code"] == "UNSUPPORTED_TYPE"
    assert bridge.cast.calls_to("POST", SEND) == []


@pytest.mark.parametrize(
    "headers",
    [{"X-GHL-Signature": ""}, {"X-GHL-Signature": "AAAA"}, {"X-GHL-Signature": "not base64!"}],
)
@pytest.mark.gen_test(timeout=20)
async def test_bad_signature_is_401_and_nothing_stored(bridge, headers):
    await ready(bridge)
    response = await bridge.ghl.post_webhook(
        bridge.daemon.url + "/api/ghl/v1/webhook/messages",
        {
            "messageId": "m",
            "locationId": "loc1",
            "type": "SMS",
            "phone": "+639171234567",
            "message": "hi",
        },
        headers=headers,
    )
    assert response.code == 401
    assert body_of(response)["error"] == "invalid_signature"
    assert bridge.daemon.outbox.records == {}
    assert not bridge.daemon.outbox.known("out:m")


@pytest.mark.gen_test(timeout=20)
async def test_body_altered_after_signing_is_401(bridge):
    await ready(bridge)
    body = json.dumps({"messageId": "m", "locationId": "loc1", "phone": "+639171234567"})
    headers = bridge.ghl.sign(body.encode())
    tampered = body.replace("+639171234567", "+639179999999")
    response = await bridge.ghl.post_webhook(
        bridge.daemon.url + "/api/ghl/v1/webhook/messages", tampered.encode(), headers=headers
    )
    assert response.code == 401


@pytest.mark.parametrize("alg", ["rsa", "ecdsa"])
@pytest.mark.gen_test(timeout=20)
async def test_legacy_signatures_are_accepted(bridge, alg):
    await ready(bridge)
    response = await bridge.ghl.post_webhook(
        bridge.daemon.url + "/api/ghl/v1/webhook/messages",
        {
            "messageId": "m-" + alg,
            "locationId": "loc1",
            "type": "SMS",
            "phone": "+639171234567",
            "message": "hi",
        },
        alg=alg,
    )
    assert response.code == 200


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"phone": ["+639171234567"]}, "phone"),
        ({"message": {"text": "hi"}}, "message"),
        ({"attachments": 5}, "attachments"),
    ],
)
@pytest.mark.gen_test(timeout=20)
async def test_wrong_field_types_are_200_and_reported_failed_naming_the_field(
    bridge, payload, field
):
    # SPEC §3: an authentic body is never a 4xx for its shape (GHL pauses the Delivery URL).
    await ready(bridge)
    response = await bridge.post_message(payload)
    assert response.code == 200
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["failed"])
    error = bridge.ghl.statuses["msg-1"][0]["error"]
    assert error["code"] == "INVALID_FIELD"
    assert field in error["message"]
    assert bridge.cast.calls_to("POST", SEND) == []


@pytest.mark.gen_test(timeout=20)
async def test_malformed_json_is_200_ignored_and_counted(bridge):
    await ready(bridge)
    response = await bridge.ghl.post_webhook(
        bridge.daemon.url + "/api/ghl/v1/webhook/messages", b"{not json"
    )
    assert response.code == 200
    assert body_of(response)["status"] == "ignored"
    metric = bridge.daemon.metrics.webhooks.labels("messages", "unusable")
    assert metric._value.get() == 1
    assert bridge.daemon.outbox.records == {}


@pytest.mark.gen_test(timeout=30)
async def test_pacing_never_exceeds_messages_per_second(bridge):
    locations = ("loc1", "loc2", "loc3", "loc4")
    await ready(bridge, {"cast": {"messages_per_second": 10}}, locations)
    for n in range(40):
        response = await bridge.post_message(
            messageId=f"m{n}", locationId=locations[n % 4], phone=f"+63917123{n:04d}"
        )
        assert response.code == 200
    await wait_for(lambda: len(bridge.cast.sent) == 40, timeout=15)
    assert bridge.cast.max_sends_in_window(1.0) <= 10
    assert len(bridge.cast.calls_to("POST", SEND)) == 40  # no 429 to discover the limit


@pytest.mark.gen_test(timeout=20)
async def test_graceful_stop_keeps_unsent_messages_and_restart_sends_them(bridge):
    await ready(bridge)
    bridge.cast.fail_next("send", 503, times=3)  # keeps the message in backoff
    await bridge.post_message()
    await wait_for(lambda: len(bridge.cast.calls_to("POST", SEND)) >= 1)
    await bridge.stop()
    assert bridge.cast.sent == []
    await bridge.start()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"], timeout=15)
    assert len(bridge.cast.sent) == 1


@pytest.mark.gen_test(timeout=20)
async def test_message_not_attempted_before_the_deadline_is_reported_expired(bridge):
    await ready(bridge)
    await bridge.stop()
    # Recorded by an earlier run that stopped before trying it, two hours ago.
    record = {
        "kind": "outbound",
        "stage": "new",
        "message_id": "old-1",
        "location_id": "loc1",
        "type": "SMS",
        "phone": "+639171234567",
        "message": "Your code is 1234",
        "attachments": [],
        "received_at": time.time() - 7200,
    }
    await write_outbox_record(bridge, "out:old-1", record)
    await bridge.start()
    await wait_for(lambda: statuses(bridge.ghl, "old-1") == ["failed"])
    assert bridge.ghl.statuses["old-1"][0]["error"]["code"] == "EXPIRED"
    assert bridge.cast.calls_to("POST", SEND) == []


@pytest.mark.gen_test(timeout=20)
async def test_attempted_message_older_than_cast_replay_window_is_not_resent(bridge):
    await ready(bridge)
    await bridge.stop()
    record = {
        "kind": "outbound",
        "stage": "new",
        "attempted": True,
        "message_id": "old-2",
        "location_id": "loc1",
        "type": "SMS",
        "phone": "+639171234567",
        "message": "Your code is 1234",
        "attachments": [],
        "received_at": time.time() - 23.5 * 3600,
    }
    await write_outbox_record(bridge, "out:old-2", record)
    await bridge.start()
    await wait_for(lambda: statuses(bridge.ghl, "old-2") == ["failed"])
    assert bridge.ghl.statuses["old-2"][0]["error"]["code"] == "OUTCOME_UNKNOWN"
    assert bridge.cast.calls_to("POST", SEND) == []


async def write_outbox_record(bridge, rid: str, record: dict) -> None:
    """Put a record into the stopped daemon's outbox through the outbox's own journal."""
    from castghld.metrics import Metrics
    from castghld.outbox import Outbox
    from castghld.state import KeyRing

    outbox = Outbox(
        bridge.config_dir.state_dir, KeyRing.load(bridge.config_dir.key_path), Metrics(), 86400.0
    )
    outbox.load()
    outbox.pipelines["outbound"] = lambda _outbox, _rid: asyncio.sleep(0)
    outbox.journal.open()
    await outbox.journal.append({"op": "put", "id": rid, "record": record})
    await outbox.journal.close()


@pytest.mark.gen_test(timeout=20)
async def test_cast_error_text_reaches_ghl_without_the_phone_number(bridge):
    await ready(bridge)
    bridge.cast.fail_next(
        "send",
        400,
        {
            "success": False,
            "error": "Cannot send to +639171234567",
            "error_code": "VALIDATION_ERROR",
        },
    )
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["failed"])
    error = bridge.ghl.statuses["msg-1"][0]["error"]
    assert error == {
        "code": "VALIDATION_ERROR",
        "type": "saas",
        "message": "Cannot send to [number]",
    }


@pytest.mark.gen_test(timeout=20)
async def test_a_resent_message_keeps_the_account_of_its_first_attempt(bridge):
    # First attempted through the default account as "OLDSENDER"; since then, loc1 got its own
    # key and sender ID: the resend after the restart must stay in the first account's scope.
    bridge.cast.api_keys["key_b"] = "acctB"
    await bridge.start()
    await bridge.install("loc1")
    await bridge.stop()
    default = CastAccount("cast_test_key", "OLDSENDER")
    await write_outbox_record(bridge, "out:m1", attempted_record("m1", default.name, "OLDSENDER"))
    extra = {"cast": {"locations": {"loc1": {"api_key": "key_b", "sender_id": "NEWSENDER"}}}}
    await bridge.start(extra)
    await wait_for(lambda: not bridge.daemon.outbox.records, timeout=10)
    [sent] = bridge.cast.sent
    assert (sent["account"], sent["sender_id"]) == ("acct", "OLDSENDER")
    assert bridge.ghl.statuses["m1"][-1]["status"] == "delivered"


@pytest.mark.gen_test(timeout=20)
async def test_a_message_whose_first_account_is_gone_is_not_resent(bridge):
    await bridge.start()
    await bridge.install("loc1")
    await bridge.stop()
    gone = CastAccount("key_removed", "OLDSENDER")
    await write_outbox_record(bridge, "out:m1", attempted_record("m1", gone.name, "OLDSENDER"))
    await bridge.start()
    await wait_for(lambda: not bridge.daemon.outbox.records, timeout=10)
    assert bridge.cast.calls_to("POST", SEND) == []
    assert bridge.ghl.statuses["m1"][-1]["error"]["code"] == "OUTCOME_UNKNOWN"


def attempted_record(message_id: str, account: str, sender_id: str) -> dict:
    return {
        "kind": "outbound",
        "stage": "new",
        "attempted": True,
        "account": account,
        "sender_id": sender_id,
        "message_id": message_id,
        "location_id": "loc1",
        "type": "SMS",
        "phone": "+639171234567",
        "message": "Your code is 1234",
        "attachments": [],
        "received_at": time.time() - 60,
    }


@pytest.mark.gen_test(timeout=30)
async def test_a_backlog_waits_as_data_not_as_a_coroutine_per_message(bridge):
    await ready(bridge, {"cast": {"messages_per_second": 8}})
    bridge.cast.latency = 0.5  # every answer takes 0.5 s: the backlog waits
    # The fake counts a request after its latency, so requests paced when they left may be
    # counted bunched on a loaded machine: its limits are not what this test is about.
    bridge.cast.messages_per_second = bridge.cast.requests_per_second = 1000
    for n in range(80):
        response = await bridge.post_message(messageId=f"m{n}", phone=f"+63917123{n:04d}")
        assert response.code == 200
    outbox = bridge.daemon.outbox
    assert outbox.running == 80
    # A few workers of the one account, not 80 parked pipelines (the rest: the fakes' handlers).
    ours = [
        t
        for t in asyncio.all_tasks()
        if t.get_coro().__qualname__.startswith(("OutboundDelivery.", "StepScheduler."))
    ]
    assert len(ours) <= SENDERS_PER_ACCOUNT + POLL_WORKERS + REPORT_WORKERS
    senders = [t for t in ours if "_send_worker" in t.get_coro().__qualname__]
    assert len(senders) == SENDERS_PER_ACCOUNT
    gc.collect()
    waiting = [r for r in outbox.records.values() if r["stage"] == "new"]
    assert len(waiting) > 40
    assert not any(gc.is_tracked(r) for r in waiting)
    await wait_for(lambda: not outbox.records, timeout=25)
    assert len(bridge.cast.sent) == 80


@pytest.mark.gen_test(timeout=20)
async def test_a_delivered_message_costs_four_journal_entries(bridge):
    # put, attempted, sent, done: the pending report, each poll and the final status are
    # redone after a crash, so they are not journaled.
    await ready(bridge)
    journal = bridge.daemon.outbox.journal
    written = journal.entries_written
    await bridge.post_message()
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"])
    await wait_for(lambda: not bridge.daemon.outbox.records)
    await bridge.stop()  # every queued entry written
    assert journal.entries_written - written == 4


@pytest.mark.gen_test(timeout=30)
async def test_a_busy_account_does_not_hold_up_another_accounts_message(bridge):
    bridge.cast.api_keys["key_b"] = "acctB"
    extra = {"cast": {"messages_per_second": 5, "locations": {"loc2": {"api_key": "key_b"}}}}
    await ready(bridge, extra, ("loc1", "loc2"))
    for n in range(40):  # 8 s of work for loc1's account
        await bridge.post_message(messageId=f"a{n}", phone=f"+63917123{n:04d}")
    accepted = time.monotonic()
    await bridge.post_message(messageId="b1", locationId="loc2")
    await wait_for(lambda: any(s["idempotency_key"] == "b1" for s in bridge.cast.sent))
    [b1] = [s for s in bridge.cast.sent if s["idempotency_key"] == "b1"]
    assert b1["time"] - accepted < 1.0
    assert len(bridge.cast.sent) < 41


@pytest.mark.gen_test(timeout=20)
async def test_a_restart_waits_one_pacing_window_before_its_first_send(bridge):
    # The process before may have used the last second's Cast budget just before it died.
    await ready(bridge)
    await bridge.stop()
    record = {
        "kind": "outbound",
        "stage": "new",
        "message_id": "m1",
        "location_id": "loc1",
        "type": "SMS",
        "phone": "+639171234567",
        "message": "Your code is 1234",
        "attachments": [],
        "received_at": time.time(),
    }
    await write_outbox_record(bridge, "out:m1", record)
    daemon = await bridge.start()
    await wait_for(lambda: bridge.cast.sent)
    assert bridge.cast.sent[0]["time"] - daemon.cast.created >= WINDOW

"""Receipts by the page: Cast's logs swept per account, per-message lookups as the fallback, the
per-IP budget shared sends first, and the ``pending`` PUT left out when the final status is known.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from daemon_process import ServeProcess
from tornado.httpclient import AsyncHTTPClient

from castghld.fakes import wait_for
from castghld.outbound import sweep
from castghld.pacing import SlidingWindowLimiter, acquire_all
from castghld.priority import LOOKUP, SWEEP, IPPriority

LOGS = "/api/v1/sms/logs"


def statuses(ghl, message_id: str) -> list[str]:
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


@pytest.fixture
def fast_sweeps(monkeypatch):
    """Sweeps every 0.1 s instead of every few seconds: the tests wait less."""
    monkeypatch.setattr(sweep, "CADENCE", ((120.0, 0.1), (900.0, 0.1)))


async def ready(bridge, logs: bool = True, extra: dict | None = None):
    bridge.cast.logs_enabled = logs
    await bridge.start(extra)
    await bridge.install("loc1")
    return bridge.daemon


async def post(bridge, count: int, delay: float = 0.0) -> list[str]:
    ids = [f"msg-{n}" for n in range(count)]
    for n, message_id in enumerate(ids):
        response = await bridge.post_message(
            messageId=message_id, phone=f"+63917123{n:04d}", message=f"secret text {n}"
        )
        assert response.code == 200
    return ids


def finished_once(ghl, message_id: str, final: str = "delivered") -> bool:
    return statuses(ghl, message_id) in (["pending", final], [final])


@pytest.mark.gen_test(timeout=30)
async def test_receipts_come_from_the_logs_pages_without_lookups(bridge, fast_sweeps, caplog):
    caplog.set_level(logging.DEBUG)
    bridge.cast.delivery_delay = 0.3
    await ready(bridge)
    ids = await post(bridge, 5)
    await wait_for(lambda: all(finished_once(bridge.ghl, m) for m in ids))
    await wait_for(lambda: not bridge.daemon.outbox.records)
    assert len(bridge.cast.sent) == 5
    assert sum(bridge.cast.status_polls.values()) == 0
    calls = bridge.cast.calls_to("GET", LOGS)
    assert calls
    assert all(c.query["limit"] == "500" and c.query["offset"] == "0" for c in calls)
    assert all(len(c.query["from"]) == 10 and c.query["from"] <= c.query["to"] for c in calls)
    # The logs carry the text and the number: parsed and dropped, never logged.
    assert "secret text" not in caplog.text
    assert "91712300" not in caplog.text


@pytest.mark.gen_test(timeout=30)
async def test_an_undelivered_receipt_in_the_logs_reports_failed(bridge, fast_sweeps):
    await ready(bridge)
    bridge.cast.set_delivery("+639171230000", "undelivered", "REJECTD")
    [message_id] = await post(bridge, 1)
    await wait_for(lambda: finished_once(bridge.ghl, message_id, "failed"))
    report = bridge.ghl.statuses[message_id][-1]
    assert report["error"]["code"] == "REJECTD"
    assert sum(bridge.cast.status_polls.values()) == 0


@pytest.mark.gen_test(timeout=30)
async def test_sweeps_page_by_offset_until_past_the_oldest_waiting(
    bridge, fast_sweeps, monkeypatch
):
    monkeypatch.setattr(sweep, "PAGE", 2)
    bridge.cast.delivery_delay = 0.5
    await ready(bridge)
    ids = await post(bridge, 5)
    await wait_for(lambda: all(finished_once(bridge.ghl, m) for m in ids))
    offsets = {c.query["offset"] for c in bridge.cast.calls_to("GET", LOGS)}
    assert {"0", "2", "4"} <= offsets
    assert sum(bridge.cast.status_polls.values()) == 0


@pytest.mark.gen_test(timeout=30)
async def test_a_404_logs_endpoint_falls_back_to_per_message_lookups(bridge, fast_sweeps):
    await ready(bridge, logs=False)
    ids = await post(bridge, 3)
    await wait_for(lambda: all(statuses(bridge.ghl, m) == ["pending", "delivered"] for m in ids))
    assert len(bridge.cast.calls_to("GET", LOGS)) == 1  # one answer says it for the account
    assert all(bridge.cast.status_polls[s["message_id"]] >= 1 for s in bridge.cast.sent)


@pytest.mark.gen_test(timeout=30)
async def test_a_logs_answer_not_in_casts_shape_falls_back_to_lookups(bridge, fast_sweeps):
    await ready(bridge)
    bridge.cast.fail_next("sms_logs", 200, body={"success": True, "data": "no logs here"})
    [message_id] = await post(bridge, 1)
    await wait_for(lambda: statuses(bridge.ghl, message_id) == ["pending", "delivered"])
    assert len(bridge.cast.calls_to("GET", LOGS)) == 1
    assert sum(bridge.cast.status_polls.values()) >= 1


@pytest.mark.gen_test(timeout=30)
async def test_a_message_the_sweeps_never_find_falls_back_to_a_lookup(bridge, fast_sweeps):
    await ready(bridge)
    empty = {"success": True, "count": 0, "logs": []}
    bridge.cast.fail_next("sms_logs", 200, body=empty, times=1000)
    [message_id] = await post(bridge, 1)
    await wait_for(lambda: statuses(bridge.ghl, message_id) == ["pending", "delivered"])
    assert len(bridge.cast.calls_to("GET", LOGS)) >= sweep.MISSES_BEFORE_LOOKUP
    assert sum(bridge.cast.status_polls.values()) >= 1


@pytest.mark.gen_test(timeout=30)
async def test_a_final_status_known_before_pending_leaves_is_the_only_put(bridge, fast_sweeps):
    await ready(bridge)
    # GHL's window for the location is closed for 2 s (429 on the first PUT).
    bridge.ghl.fail_next("status", 429, headers={"Retry-After": "2"})
    await bridge.post_message(messageId="first", phone="+639171230001")
    await wait_for(lambda: bridge.ghl.calls_to("PUT", "/conversations/messages/first"))
    await bridge.post_message(messageId="second", phone="+639171230002")
    await wait_for(lambda: finished_once(bridge.ghl, "second"))
    assert statuses(bridge.ghl, "second") == ["delivered"]
    await wait_for(lambda: finished_once(bridge.ghl, "first"))
    text = (await AsyncHTTPClient().fetch(bridge.daemon.url + "/metrics")).body.decode()
    assert "castghld_ghl_status_puts_saved_total 1.0" in text


@pytest.mark.gen_test(timeout=90)
async def test_kill9_during_a_sweep_loses_no_receipt(config_dir, fake_ghl, fake_cast):
    fake_cast.logs_enabled = True
    serve = ServeProcess(config_dir, fake_ghl, fake_cast)
    try:
        await serve.start()
        await serve.install("loc1")
        fake_cast.hang("sms_logs")
        assert (await serve.post_message("m-sweep")).code == 200
        await wait_for(lambda: fake_cast.hung("sms_logs") == 1)
        serve.kill9()
        fake_cast.release("sms_logs")
        await serve.start()
        await wait_for(lambda: "delivered" in statuses(fake_ghl, "m-sweep"), timeout=30)
        assert statuses(fake_ghl, "m-sweep")[-1] == "delivered"
        assert statuses(fake_ghl, "m-sweep").count("delivered") == 1
        assert len(fake_cast.sent) == 1
        assert await serve.terminate() == 0
    finally:
        serve.close()
    assert fake_ghl.violations == []
    assert fake_cast.violations == []


# -- the per-IP budget: sends, then sweeps, then lookups ----------------------------------------


@pytest.mark.gen_test(timeout=10)
async def test_a_lookup_waits_while_a_send_that_could_leave_waits():
    ip, share, account = (SlidingWindowLimiter(n, 0.3) for n in (1, 10, 10))
    priority = IPPriority(ip)
    await ip.acquire()  # the window is full for 0.3 s
    order = []

    async def send():
        with priority.send(account):
            await acquire_all(account, ip)
        order.append("send")

    async def lookup():
        await priority.acquire(LOOKUP, share)
        order.append("lookup")

    lookup_task = asyncio.ensure_future(lookup())
    await asyncio.sleep(0.05)
    await asyncio.gather(send(), lookup_task)
    assert order == ["send", "lookup"]


@pytest.mark.gen_test(timeout=10)
async def test_a_sweep_goes_before_a_lookup():
    ip, share = SlidingWindowLimiter(1, 0.3), SlidingWindowLimiter(10, 0.3)
    priority = IPPriority(ip)
    await ip.acquire()
    order = []

    async def take(rank, name):
        await priority.acquire(rank, share)
        order.append(name)

    lookup_task = asyncio.ensure_future(take(LOOKUP, "lookup"))
    await asyncio.sleep(0.05)
    await asyncio.gather(take(SWEEP, "sweep"), lookup_task)
    assert order == ["sweep", "lookup"]


@pytest.mark.gen_test(timeout=10)
async def test_a_sweep_is_not_starved_by_sends_that_keep_the_budget_full(monkeypatch):
    from castghld import priority as priority_module

    monkeypatch.setattr(priority_module, "SWEEP_FLOOR", 0.3)
    ip, share, account = (SlidingWindowLimiter(n, 0.1) for n in (2, 10, 100))
    priority = IPPriority(ip)
    swept = asyncio.ensure_future(priority.acquire(SWEEP, share))
    sends = 0
    while not swept.done():  # sends back to back, always one waiting that could leave
        with priority.send(account):
            await acquire_all(account, ip)
        sends += 1
        assert sends < 200, "the sweep never got a slot"
    await swept


@pytest.mark.gen_test(timeout=10)
async def test_fake_cast_models_casts_per_ip_burst_of_50():
    from castghld.fakes import FakeCast

    fake = FakeCast(ip_burst=50)
    await fake.start()
    try:
        client = AsyncHTTPClient()
        url = fake.url + "/api/v1/sms/status/CAST0000"
        headers = {"X-API-Key": "cast_test_key"}
        answers = await asyncio.gather(
            *(client.fetch(url, headers=headers, raise_error=False) for _ in range(80))
        )
        codes = [answer.code for answer in answers]
        assert codes.count(404) >= 50  # a burst of 50 (an unknown id: 404), more than 30 in 1 s
        assert 429 in codes
    finally:
        await fake.stop()


@pytest.mark.gen_test(timeout=30)
async def test_a_message_sweeps_cannot_read_for_too_long_falls_back_to_a_lookup(
    bridge, fast_sweeps, monkeypatch
):
    # The logs answer 500 to every sweep: past SWEEP_PATIENCE the message is looked up.
    monkeypatch.setattr(sweep, "SWEEP_PATIENCE", 1.0)
    await ready(bridge)
    bridge.cast.fail_next("sms_logs", 500, times=100000)
    [message_id] = await post(bridge, 1)
    await wait_for(lambda: statuses(bridge.ghl, message_id) == ["pending", "delivered"])
    assert sum(bridge.cast.status_polls.values()) >= 1


@pytest.mark.gen_test(timeout=30)
async def test_two_messages_cast_gave_the_same_id_both_finish(bridge, fast_sweeps):
    # A Cast that answers two sends with one message_id must not strand either message.
    await ready(bridge)
    taken = {"success": True, "message_id": "CAST-SAME-ID", "parts": 1}
    bridge.cast.fail_next("send", 200, body=taken, times=2)
    await post(bridge, 2)
    await wait_for(lambda: len(bridge.cast.calls_to("POST", "/api/v1/sms/send")) == 2)
    await wait_for(lambda: not bridge.daemon.outbox.records, timeout=20)

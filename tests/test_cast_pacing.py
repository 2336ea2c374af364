"""Cast pacing against the fake Cast over real HTTP: per-account limit, per-IP budget, no HOL.

The fake Cast records every send (time, account) and every breach of its 10 sends/s per account
and 30 requests/s per IP as a violation.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from castghld.cast import CastClient, CastError
from castghld.fakes import FakeCast, max_in_window, wait_for
from castghld.metrics import Metrics

SEND = "/api/v1/sms/send"
STATUS = "/api/v1/sms/status/"


@pytest.fixture(autouse=True)
def frozen_heap():
    """Run with the heap `castghld serve` runs with: it freezes what startup loaded (`gc.freeze()`
    in app.run), so a full collection walks only what it made since (~10 ms with 100k waiting
    messages). In the suite's one process these tests come after tests/reliability, whose
    leftovers (85k-120k tracked objects) make a full collection a 50-100 ms stall between a
    request's pacing slot and its departure: the fake Cast then sees the bunch as a breach (seen
    in fresh-clone CI runs, never when this file runs alone). The assertions are unchanged."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def fake_cast(io_loop):
    """Two Cast accounts (overrides conftest's: `bridge` uses this one)."""
    fake = FakeCast(api_keys={"cast_test_key": "acct", "key_b": "acctB"})
    io_loop.run_sync(fake.start)
    yield fake
    io_loop.run_sync(fake.stop)
    assert fake.violations == []


def client_for(config_dir, fake: FakeCast, extra: dict | None = None) -> CastClient:
    cast = {"api_base": fake.url, "locations": {"loc3": {"api_key": "key_b"}}}
    config = config_dir.load({"cast": cast, **(extra or {})})
    return CastClient(config, Metrics())


async def send(client: CastClient, location_id: str, key: str) -> dict:
    return await client.send_once(
        client.account_for(location_id), "+639171234567", f"text {key}", key
    )


@pytest.mark.gen_test(timeout=40)
async def test_sends_keep_the_account_pace_while_status_polls_take_their_half(
    config_dir, fake_cast
):
    client = client_for(config_dir, fake_cast)
    account = client.account_for("loc1")
    stop = asyncio.Event()

    async def poll() -> None:
        message_id = fake_cast.sent[-1]["message_id"] if fake_cast.sent else "CAST0"
        try:
            await client.status(account, message_id)
        except CastError:
            pass  # 404 for the placeholder id before the first send

    async def poller():
        # Bursts of polls (as after a restart, or many messages sent in one second) queued ahead
        # of the sends: sends that waited behind a burst must not then leave together.
        while not stop.is_set():
            await asyncio.gather(*(poll() for _ in range(40)))

    polling = asyncio.ensure_future(poller())
    await wait_for(lambda: len(fake_cast.calls_to("GET", STATUS)) >= 10)
    sends = asyncio.gather(*(send(client, "loc1", f"m{n}") for n in range(60)))
    await wait_for(lambda: len(fake_cast.sent) == 60, timeout=20)
    stop.set()
    await polling
    await sends

    assert fake_cast.violations == []
    assert fake_cast.max_sends_in_window(1.0, "acct") <= 10
    assert len(fake_cast.calls_to("POST", SEND)) == 60  # no 429 to discover the limit
    first, last = fake_cast.sent[0]["time"], fake_cast.sent[-1]["time"]
    polls = [c.time for c in fake_cast.calls_to("GET", STATUS) if first <= c.time <= last]
    assert len(polls) >= 5 * (last - first)  # the polls really ran alongside the sends
    assert max_in_window(polls, 1.0) <= 15  # at most half of the 30 requests/s
    assert last - first < 6.5  # and the sends still got their full 10/s


@pytest.mark.gen_test(timeout=30)
async def test_a_busy_account_does_not_delay_another_accounts_send(config_dir, fake_cast):
    client = client_for(config_dir, fake_cast)
    fake_cast.latency = 0.05
    queued = [asyncio.ensure_future(send(client, "loc1", f"a{n}")) for n in range(100)]
    # Account A is at its limit and has ~90 sends queued behind it.
    await wait_for(lambda: len(fake_cast.sent) >= 12)
    started = time.monotonic()
    await send(client, "loc3", "b-otp")  # loc3 has its own API key: account acctB
    [sent_b] = [s for s in fake_cast.sent if s["account"] == "acctB"]
    assert sent_b["time"] - started < 0.5
    assert time.monotonic() - started < 0.5
    assert not all(task.done() for task in queued)  # A was still busy all along
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    assert fake_cast.max_sends_in_window(1.0, "acct") <= 10


@pytest.mark.gen_test(timeout=30)
async def test_after_begin_stop_no_new_send_starts(config_dir, fake_cast):
    client = client_for(config_dir, fake_cast, {"delivery": {"concurrency": 2}})
    fake_cast.hang("send")
    tasks = [
        asyncio.ensure_future(send(client, "loc1", "m1")),
        asyncio.ensure_future(send(client, "loc3", "m3")),
        asyncio.ensure_future(send(client, "loc1", "m2")),  # waits for a concurrency slot
    ]
    await wait_for(lambda: fake_cast.hung("send") == 2)  # m1 and m3 in flight, m2 queued
    assert client.sends.count == 2
    client.begin_stop()
    later = asyncio.ensure_future(send(client, "loc3", "m4"))
    fake_cast.release("send")
    assert await client.sends.wait_idle(5.0)
    assert {s["idempotency_key"] for s in fake_cast.sent} == {"m1", "m3"}
    # m2 and m4 park instead of sending; the outbox stop cancels them.
    with pytest.raises(AssertionError):
        await wait_for(lambda: len(fake_cast.calls_to("POST", SEND)) > 2, timeout=0.3)
    assert not tasks[2].done() and not later.done()
    for task in (tasks[2], later):
        task.cancel()
    await asyncio.gather(tasks[0], tasks[1])
    await asyncio.gather(tasks[2], later, return_exceptions=True)
    assert len(fake_cast.calls_to("POST", SEND)) == 2
    assert client.sends.count == 0


@pytest.mark.gen_test(timeout=40)
async def test_a_location_with_its_own_api_key_is_paced_on_its_own_account(bridge):
    extra = {"cast": {"messages_per_second": 10, "locations": {"loc3": {"api_key": "key_b"}}}}
    await bridge.start(extra)
    await bridge.install("loc1")
    await bridge.install("loc3")
    for n in range(30):
        for location_id in ("loc1", "loc3"):
            response = await bridge.post_message(
                messageId=f"{location_id}-{n}",
                locationId=location_id,
                phone=f"+63917123{n:04d}",
            )
            assert response.code == 200
    await wait_for(lambda: len(bridge.cast.sent) == 60, timeout=20)
    accounts = {s["idempotency_key"]: s["account"] for s in bridge.cast.sent}
    assert {k for k, a in accounts.items() if a == "acctB"} == {f"loc3-{n}" for n in range(30)}
    assert bridge.cast.max_sends_in_window(1.0, "acct") <= 10
    assert bridge.cast.max_sends_in_window(1.0, "acctB") <= 10
    # Each account used its own 10/s: together they went faster than one account could.
    assert bridge.cast.max_sends_in_window(1.0) > 10
    assert len(bridge.cast.calls_to("POST", SEND)) == 60


@pytest.mark.gen_test(timeout=20)
async def test_overdue_status_polls_are_skipped_for_the_latest_due_one(bridge):
    polls = [0.2, 0.3, 0.4, 0.5, 0.6, 1.5]
    await bridge.start({"delivery": {"status_polls": polls}})
    await bridge.install("loc1")
    bridge.cast.delivery_delay = 100.0  # every poll answers "sent"
    bridge.cast.hang("sms_status")
    await bridge.post_message()
    await wait_for(lambda: bridge.cast.hung("sms_status") == 1)  # the 0.2 s poll, held
    sent_at = bridge.cast.sent[0]["time"]
    await wait_for(lambda: time.monotonic() >= sent_at + 0.8)  # 0.3 ... 0.6 are now overdue
    bridge.cast.release("sms_status")
    await wait_for(lambda: not bridge.daemon.outbox.records, timeout=10)
    calls = bridge.cast.calls_to("GET", STATUS)
    # The held poll, one for the latest due point (0.6 s) right away, and the 1.5 s one.
    assert len(calls) == 3
    assert calls[1].time - sent_at < 1.2
    assert calls[2].time - sent_at >= 1.5 - 0.05


@pytest.mark.gen_test(timeout=20)
async def test_a_429_on_a_status_poll_pauses_that_accounts_polls(config_dir, fake_cast):
    client = client_for(config_dir, fake_cast)
    account = client.account_for("loc1")
    [sent_id] = [(await send(client, "loc1", "m1"))["message_id"]]
    fake_cast.fail_next("sms_status", 429, headers={"Retry-After": "1"})
    with pytest.raises(CastError):
        await client.status(account, sent_id)
    other = client.account_for("loc3")
    other_id = (await send(client, "loc3", "m2"))["message_id"]
    await client.status(other, other_id)  # another account polls on at once
    await client.status(account, sent_id)
    first, other_poll, second = fake_cast.calls_to("GET", STATUS)
    assert other_poll.time - first.time < 0.5
    assert second.time - first.time >= 1.0

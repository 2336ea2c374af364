"""Pacing: the sliding window holds under load, Retry-After is honoured."""

from __future__ import annotations

import asyncio
import time

import pytest

from castghld.pacing import SlidingWindowLimiter, acquire_all, parse_retry_after, retry_delay


@pytest.mark.gen_test(timeout=10)
async def test_window_never_admits_more_than_limit():
    limiter = SlidingWindowLimiter(5, 0.2)
    times: list[float] = []

    async def take():
        await limiter.acquire()
        times.append(time.monotonic())

    await asyncio.gather(*(take() for _ in range(20)))
    for i in range(len(times) - 5):
        assert times[i + 5] - times[i] >= 0.2


@pytest.mark.gen_test(timeout=10)
async def test_pause_holds_everyone_back():
    limiter = SlidingWindowLimiter(100, 1.0)
    limiter.pause_until(time.monotonic() + 0.2)
    started = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - started >= 0.2


def test_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_retry_delay_never_shorter_than_retry_after():
    assert all(retry_delay(0, 1.0, base=0.01) >= 1.0 for _ in range(50))
    assert all(0 <= retry_delay(3, None, base=1.0, cap=5.0) <= 5.0 for _ in range(50))


# -- acquire_all: one slot in several limiters at one instant ----------------------------------


def assert_within_limit(times: list[float], limit: int, period: float) -> None:
    times = sorted(times)
    for i in range(len(times) - limit):
        # Times are read right after the slot was recorded (no await between): microseconds late.
        assert times[i + limit] - times[i] >= period - 1e-4, (i, times[i], times[i + limit])


@pytest.mark.gen_test(timeout=10)
async def test_acquire_all_records_every_limiter_at_the_same_instant():
    a, b = SlidingWindowLimiter(1, 0.3), SlidingWindowLimiter(1, 0.3)
    taken = await acquire_all(a, b)
    await b.acquire()
    assert time.monotonic() - taken >= 0.3 - 1e-4
    taken_b = time.monotonic()
    await a.acquire()
    assert time.monotonic() - taken >= 0.3 - 1e-4
    assert time.monotonic() - taken_b < 0.1  # a was free by then: b's wait covered it


@pytest.mark.gen_test(timeout=10)
async def test_acquire_all_mixed_with_acquire_keeps_every_limit():
    own = SlidingWindowLimiter(4, 0.2)
    shared = SlidingWindowLimiter(6, 0.2)
    times: dict[str, list[float]] = {"own": [], "shared": []}

    async def joint():
        at = await acquire_all(own, shared)
        times["own"].append(at)
        times["shared"].append(at)

    async def alone(limiter, name):
        await limiter.acquire()
        times[name].append(time.monotonic())

    jobs = []
    for n in range(36):
        jobs.append(joint() if n % 3 == 0 else alone(*[(own, "own"), (shared, "shared")][n % 2]))
    await asyncio.gather(*jobs)
    assert len(times["own"]) + len(times["shared"]) == 12 + 12 + 24
    assert_within_limit(times["own"], 4, 0.2)
    assert_within_limit(times["shared"], 6, 0.2)


@pytest.mark.gen_test(timeout=10)
async def test_sends_that_waited_behind_other_requests_do_not_leave_in_a_bunch():
    """The review's case: polls queued on the per-IP limiter ahead of one account's sends."""
    account = SlidingWindowLimiter(5, 0.2)
    ip = SlidingWindowLimiter(15, 0.2)
    sends: list[float] = []

    async def send():
        sends.append(await acquire_all(account, ip))

    polls = [asyncio.ensure_future(ip.acquire()) for _ in range(25)]
    await asyncio.sleep(0)  # the polls are queued first
    await asyncio.gather(*(send() for _ in range(20)), *polls)
    assert len(sends) == 20
    assert_within_limit(sends, 5, 0.2)


@pytest.mark.gen_test(timeout=10)
async def test_waiting_for_its_own_limiter_does_not_hold_the_shared_one():
    busy, other = SlidingWindowLimiter(1, 0.5), SlidingWindowLimiter(1, 0.5)
    shared = SlidingWindowLimiter(100, 1.0)
    await busy.acquire()
    blocked = asyncio.ensure_future(acquire_all(busy, shared))  # waits ~0.5 s for `busy`
    await asyncio.sleep(0)
    started = time.monotonic()
    await acquire_all(other, shared)
    await shared.acquire()
    assert time.monotonic() - started < 0.1
    assert not blocked.done()
    await blocked


@pytest.mark.gen_test(timeout=10)
async def test_a_pause_on_its_own_limiter_releases_the_shared_one():
    own, shared = SlidingWindowLimiter(10, 1.0), SlidingWindowLimiter(1, 0.2)
    await shared.acquire()
    # Queued on `shared` (own is free), then own is paused while it waits there.
    waiting = asyncio.ensure_future(acquire_all(own, shared))
    await asyncio.sleep(0)
    own.pause_until(time.monotonic() + 0.6)
    started = time.monotonic()
    await shared.acquire()  # the shared slot frees after 0.2 s; the paused waiter lets it go
    assert time.monotonic() - started < 0.4
    taken = await waiting
    assert taken - started >= 0.6 - 1e-3


@pytest.mark.gen_test(timeout=10)
async def test_acquire_all_is_fifo_per_limiter():
    shared = SlidingWindowLimiter(1, 0.03)
    order: list[int] = []

    async def joint(n):
        await acquire_all(SlidingWindowLimiter(5, 1.0), shared)
        order.append(n)

    async def alone(n):
        await shared.acquire()
        order.append(n)

    await asyncio.gather(*(joint(n) if n % 2 else alone(n) for n in range(10)))
    assert order == list(range(10))


@pytest.mark.gen_test(timeout=10)
async def test_cancelled_waiter_leaves_no_lock_behind():
    own, shared = SlidingWindowLimiter(1, 10.0), SlidingWindowLimiter(1, 0.1)
    await own.acquire()
    await shared.acquire()
    stuck = asyncio.ensure_future(acquire_all(own, shared))
    behind = asyncio.ensure_future(acquire_all(shared))
    await asyncio.sleep(0)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    await asyncio.wait_for(behind, 1.0)
    assert not own._lock.locked() and not shared._lock.locked()

"""Pacing: the sliding window holds under load, Retry-After is honoured."""

from __future__ import annotations

import asyncio
import time

import pytest

from castghld.pacing import SlidingWindowLimiter, parse_retry_after, retry_delay


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

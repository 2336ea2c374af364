"""Rate limiting and retry timing shared by both upstream clients.

``SlidingWindowLimiter`` guarantees that no more than ``limit`` acquisitions complete in any
window of ``period`` seconds (measured on the monotonic clock of this process): it is how we stay
under Cast's per-account and per-IP limits and GHL's per-location limit instead of discovering them
through 429s. Waiters are served in FIFO order. ``pause_until`` lets an upstream's 429 or
``X-RateLimit-Remaining: 0`` hold everyone back until a moment.

``acquire_all`` takes a slot in several limiters at the same instant (a Cast send counts against
its account and against the per-IP limit): a request that waited for one limiter must not leave
later than the moment the other one recorded, or the requests that waited leave in a bunch.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import math
import random
import time


class SlidingWindowLimiter:
    def __init__(self, limit: int, period: float):
        if limit < 1 or period <= 0:
            raise ValueError("limit must be >= 1 and period > 0")
        self.limit = limit
        self.period = period
        self._times: collections.deque[float] = collections.deque()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause_until(self, moment: float) -> None:
        self._paused_until = max(self._paused_until, moment)

    def _delay(self, now: float) -> float:
        while self._times and self._times[0] <= now - self.period:
            self._times.popleft()
        delay = max(0.0, self._paused_until - now)
        if len(self._times) >= self.limit:
            delay = max(delay, self._times[0] + self.period - now)
        return delay

    async def acquire(self) -> None:
        # The lock makes waiters FIFO: only the head of the queue looks at the window.
        async with self._lock:
            while True:
                now = time.monotonic()
                delay = self._delay(now)
                if delay <= 0:
                    self._times.append(now)
                    return
                # A hair over the computed delay so the window has surely moved on.
                await asyncio.sleep(delay + 0.001)

    def delay(self) -> float:
        """Seconds until an acquisition could complete (0: now)."""
        return self._delay(time.monotonic())

    def give_back(self) -> None:
        """Return one slot taken by `try_acquire_all` (what it admitted turned out harmless)."""
        if self._times:
            self._times.pop()

    def idle(self) -> bool:
        return not self._times or self._times[-1] <= time.monotonic() - self.period


async def acquire_all(*limiters: SlidingWindowLimiter) -> float:
    """Wait until every limiter has capacity, then take a slot in each at the same instant.

    Returns that instant (``time.monotonic()``). Check and record happen with no await between
    them, and every limiter is only ever recorded into while its lock is held (here and in
    ``SlidingWindowLimiter.acquire``), so the limits hold when both are used on one limiter.

    The locks are taken in the order given and each limiter is waited for while holding only the
    locks before it: pass the most shared limiter last, so a caller waiting for its own (account)
    limiter does not hold the shared (per-IP) one and block everyone else. Waiters are FIFO per
    limiter. Pass the limiters in one consistent order everywhere (two calls taking the same two
    locks in opposite orders could wait on each other).
    """
    order = list(dict.fromkeys(limiters))  # each limiter once, in the given order
    held = 0  # order[:held] are locked by us
    try:
        while True:
            now = time.monotonic()
            blocked = next((i for i in range(held) if order[i]._delay(now) > 0), None)
            if blocked is not None:
                # Wait for it holding only the locks up to it: the later (more shared) limiters
                # stay free for others meanwhile; a pause (429) on an earlier one lands here too.
                while held > blocked + 1:
                    held -= 1
                    order[held]._lock.release()
                await asyncio.sleep(order[blocked]._delay(now) + 0.001)
                continue
            if held == len(order):
                for limiter in order:
                    limiter._times.append(now)
                return now
            await order[held]._lock.acquire()
            held += 1
    finally:
        while held:
            held -= 1
            order[held]._lock.release()


def try_acquire_all(*limiters: SlidingWindowLimiter) -> float:
    """Take a slot in every limiter now if each has one free (returns 0.0), else take nothing and
    return the seconds until all of them could: for callers that answer "retry later" (429)
    instead of waiting. Not to be mixed with `acquire` on the same limiter."""
    now = time.monotonic()
    delay = max(limiter._delay(now) for limiter in limiters)
    if delay <= 0:
        for limiter in limiters:
            limiter._times.append(now)
    return delay


class LimiterMap:
    """One limiter per key (location, Cast account); idle ones are dropped to bound memory."""

    MAX_IDLE_SCAN = 1000

    def __init__(self, limit: int, period: float):
        self.limit = limit
        self.period = period
        self._limiters: dict[str, SlidingWindowLimiter] = {}

    def get(self, key: str) -> SlidingWindowLimiter:
        limiter = self._limiters.get(key)
        if limiter is None:
            if len(self._limiters) >= self.MAX_IDLE_SCAN:
                self._drop_idle()
            limiter = self._limiters[key] = SlidingWindowLimiter(self.limit, self.period)
        return limiter

    def _drop_idle(self) -> None:
        for key in [k for k, v in self._limiters.items() if v.idle() and not v._lock.locked()]:
            del self._limiters[key]

    def __len__(self) -> int:
        return len(self._limiters)


def backoff_delay(attempt: int, base: float = 1.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


# The longest wait one Retry-After header can impose: `inf` or a date years away must not pause
# an account (or a location) for good.
MAX_RETRY_AFTER = 300.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), within
    [0, MAX_RETRY_AFTER]; None when absent or unreadable (``nan`` included)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if when is None:
            return None
        try:
            seconds = when.timestamp() - time.time()
        except (OverflowError, ValueError):
            return MAX_RETRY_AFTER
    if math.isnan(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def parse_interval_ms(value: str | None) -> float | None:
    """Seconds from GHL's ``X-RateLimit-Interval-Milliseconds``, capped like Retry-After; None
    when absent or not a plain number of milliseconds."""
    if not value or not value.isdigit() or len(value) > 15:
        return None
    return min(MAX_RETRY_AFTER, int(value) / 1000.0)


def retry_delay(
    attempt: int, retry_after: float | None, base: float = 1.0, cap: float = 300.0
) -> float:
    """The wait before retry ``attempt`` (0-based), never shorter than Retry-After."""
    delay = backoff_delay(attempt, base, cap)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 3600.0))
    return delay

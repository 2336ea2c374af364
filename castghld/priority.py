"""Who goes first in Cast's per-IP budget: sends, then receipt sweeps, then single lookups.

Every Cast request of the daemon shares one per-IP limit (SPEC §5). A send is what the customer
waits for; a receipt sweep finishes hundreds of messages with one request; a single status
lookup finishes one. `IPPriority` hands out the per-IP slots in that order.

Guarantees:
- A sweep or a lookup takes a slot only when no send that could leave now (its account's pace
  has room) is waiting for the per-IP limiter, and only when its share limiter (at most half of
  the budget, `CastClient.poll_limiter`) has room too: a lookup never delays such a send.
- A lookup also yields to a waiting sweep.
- No starvation of receipts: a sweep that has waited ``SWEEP_FLOOR`` seconds queues for the next
  slot in FIFO order with the sends, at most ``FLOOR_SWEEPS_PER_SECOND`` such sweeps for all
  accounts together: a campaign that keeps the budget full still gets each account's receipts
  every few seconds (every ``SWEEP_FLOOR`` seconds, or every N seconds for N accounts), for a few
  percent of the budget however many accounts send. Lookups have no floor: they go when the sends
  leave room.
- The limits themselves hold (check and record with no await between them, as in pacing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from castghld.pacing import SlidingWindowLimiter, acquire_all

SWEEP = 1
LOOKUP = 2
# A sweep waiting this long stops yielding to sends and queues with them.
SWEEP_FLOOR = 4.0
# How many of those sweeps may go per second, all accounts together.
FLOOR_SWEEPS_PER_SECOND = 1
# How often a request that yields looks again (the sends ahead of it leave within ms).
YIELD_TICK = 0.02


class IPPriority:
    """The per-IP limiter `ip`, shared by priority (see the module docstring)."""

    def __init__(self, ip: SlidingWindowLimiter):
        self.ip = ip
        self._sends: list[SlidingWindowLimiter] = []  # account limiters of sends pacing now
        self._waiting = {SWEEP: 0, LOOKUP: 0}
        self._floor = SlidingWindowLimiter(FLOOR_SWEEPS_PER_SECOND, 1.0)

    @contextlib.contextmanager
    def send(self, account: SlidingWindowLimiter) -> Iterator[None]:
        """Around a send's wait for its slots: while its account has room, it goes first."""
        self._sends.append(account)
        try:
            yield
        finally:
            self._sends.remove(account)

    def _yields(self, rank: int, now: float) -> bool:
        if any(limiter._delay(now) <= 0 for limiter in self._sends):
            return True
        return rank == LOOKUP and self._waiting[SWEEP] > 0

    async def acquire(self, rank: int, share: SlidingWindowLimiter) -> None:
        """A slot in `share` and in the per-IP limiter for a sweep (`SWEEP`) or a lookup
        (`LOOKUP`), after every request that goes first."""
        started = time.monotonic()
        self._waiting[rank] += 1
        try:
            while True:
                now = time.monotonic()
                if rank == SWEEP and now - started >= SWEEP_FLOOR:
                    await acquire_all(self._floor, share, self.ip)
                    return
                wait = YIELD_TICK
                if not self._yields(rank, now):
                    wait = max(share._delay(now), self.ip._delay(now))
                    free = not share._lock.locked() and not self.ip._lock.locked()
                    if wait <= 0 and free:
                        share._times.append(now)
                        self.ip._times.append(now)
                        return
                    wait = min(max(wait, 0.0) + 0.001, YIELD_TICK) if free else YIELD_TICK
                await asyncio.sleep(wait)
        finally:
            self._waiting[rank] -= 1

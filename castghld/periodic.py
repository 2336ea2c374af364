"""Waits between the runs of a loop whose period is a config key (token sweeps, reconciliation).

Guarantees:
- The period is read from the config at every wait, not once when the loop starts, and a reload
  (`PeriodicWaits.config_changed`) re-measures a wait in progress against the new value: a period
  shortened by SIGHUP takes effect at once (the next run comes at the last one + the new period,
  at once if that has passed), a longer one delays the next run. No loop is restarted.
- Each wait is jittered by ±10 %, drawn once per wait, so many daemons do not run in step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable


class PeriodicWaits:
    """The waits of one component's loops; `config_changed` wakes every wait in progress."""

    def __init__(self) -> None:
        self._changed: asyncio.Future[None] | None = None

    def config_changed(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def wait(self, period: Callable[[], float]) -> None:
        """Return `period()` (read again after each reload) seconds, ±10 %, after the call."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        jitter = random.uniform(0.9, 1.1)
        while (remaining := started + period() * jitter - loop.time()) > 0:
            if self._changed is None:
                self._changed = loop.create_future()
            await asyncio.wait([self._changed], timeout=remaining)

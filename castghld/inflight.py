"""Counting work in flight so that a graceful stop can wait for it, with a bound.

Used for HTTP requests being answered, Cast sends whose answer is not in yet and GHL inbound
posts: each is work that, cut short, is either lost to the client or repeated after a restart.
"""

from __future__ import annotations

import asyncio
from typing import Any


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    def __enter__(self) -> InFlight:
        self.enter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.leave()

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight; False if `timeout` seconds pass first."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:  # not the builtin on Python 3.10
            return False
        return True

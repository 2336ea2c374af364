"""Single flight for token requests (refreshes, mints, code exchanges), generations, and what a
stop does with the requests in flight.

Guarantees:

- GHL refresh tokens are single-use, so refreshes and mints are single-flight per location (and
  per company): every caller that needs one while one is in flight waits for that one. Each runs as
  its own task, so a cancelled caller never abandons an answer that must be stored.
- Generations: an answer (refresh, mint) is stored only if the record is still the one the request
  was made for (`same_generation`: same refresh token and ``installed_at``). A refresh or mint in
  flight while the location is uninstalled, reinstalled (code exchange) or re-minted never
  overwrites the newer pair.
- At shutdown no refresh, mint or code exchange starts; those in flight get `REFRESH_STOP_WAIT`
  to store their answer, then they are cancelled and named in an error log line (never stored
  into a closed store).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from castghld.ghl import TokenUnavailable
from castghld.tokens.store import INSTALLS, log

# At shutdown no new refresh starts; one already sent may have spent its single-use refresh token
# at GHL, so its answer must be stored: we wait for it up to this long after the stop began
# (longer than the HTTP request timeout, so such a refresh has either an answer or an error).
REFRESH_STOP_WAIT = 12.0

T = TypeVar("T")


def same_generation(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """True if `a` and `b` are the same install of a location (status changes aside)."""
    if a is None or b is None:
        return a is b
    keys = ("refresh_token", "installed_at")
    return all(a.get(k) == b.get(k) for k in keys)


class SingleFlight:
    """The token requests in flight: one task per (section, key) pair, and the code exchanges."""

    def __init__(self) -> None:
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}
        self.exchanges: set[asyncio.Task] = set()  # OAuth code exchanges (install_from_code)
        self.stopping_since: float | None = None

    @property
    def stopping(self) -> bool:
        return self.stopping_since is not None

    def begin_stop(self) -> None:
        """From now on no token request starts (callers get a retryable TokenUnavailable)."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()

    def get(self, section: str, key: str) -> asyncio.Task | None:
        return self.tasks.get((section, key))

    def join(self, section: str, key: str, make: Callable[[], Awaitable[str]]) -> asyncio.Task:
        """The task in flight for this pair, or a new one from `make` (refresh, mint)."""
        flight = (section, key)
        task = self.tasks.get(flight)
        if task is None:
            if self.stopping:
                raise TokenUnavailable(key, "castghld is stopping", retryable=True)
            task = asyncio.ensure_future(make())
            self.tasks[flight] = task

            def done(finished: asyncio.Task) -> None:
                if self.tasks.get(flight) is finished:
                    del self.tasks[flight]

            task.add_done_callback(done)
        return task

    async def exchange(self, exchange: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """`exchange()` (an OAuth code exchange) as a task of its own that a stop waits for like
        a refresh: once the code is sent, GHL may have spent it, so its answer must be stored."""
        if self.stopping:
            raise TokenUnavailable("-", "castghld is stopping", retryable=True)
        task = asyncio.ensure_future(exchange())
        self.exchanges.add(task)
        task.add_done_callback(self.exchanges.discard)
        return await asyncio.shield(task)

    async def drain(self, stop_wait: float) -> None:
        """Let the requests in flight store their answers until `stop_wait` after `begin_stop`,
        then cancel what is left, naming each in an error log line."""
        self.begin_stop()
        waiting = [*self.tasks.values(), *self.exchanges]
        if waiting:
            assert self.stopping_since is not None
            wait = self.stopping_since + stop_wait - time.monotonic()
            await asyncio.wait(waiting, timeout=max(0.1, wait))
        for task in list(self.exchanges):
            task.cancel()
            log.error(
                "stopping: no answer yet to an OAuth code exchange; if GHL spent the code, the "
                "location must install again",
                extra={"outcome": "abandoned", "reason": "shutdown"},
            )
        # The state store closes after this: an answer arriving later could not be stored.
        for (section, key), task in list(self.tasks.items()):
            task.cancel()
            log.error(
                "stopping: no answer yet to the token request for %s=%s; if GHL spent its "
                "refresh token, the location needs a re-mint or a reinstall",
                "location" if section == INSTALLS else "company",
                key,
                extra={"location_id": key, "outcome": "abandoned", "reason": "shutdown"},
            )

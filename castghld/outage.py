"""Whether each Cast account's sends get answers, so an outage is logged once, not per attempt.

Guarantees: while Cast does not answer an account's sends (no answer, or a 500/503/504), the
first failed attempt is logged at warning with what Cast did (not) answer and a note that the
next ones are logged at debug; the first answer after it (a success or any refusal: Cast is
answering) is logged once at info with how many attempts failed and for how long. Each change is
counted in `castghld_cast_outages_total{event="began"|"ended"}`. Other retried failures (429,
a carrier's 502) say something about one message or our pace: they stay at warning each time.
"""

from __future__ import annotations

import logging
import time

from castghld.cast import CastError
from castghld.metrics import Metrics

log = logging.getLogger("castghld.outbound")

# Cast answering these says it is unwell, not that one message or our pace is wrong.
OUTAGE_STATUSES = frozenset({500, 503, 504, 599})


def is_outage(error: CastError) -> bool:
    return error.status in OUTAGE_STATUSES


class CastOutages:
    """Per account name: (monotonic start, failed attempts) while its sends get no answer."""

    def __init__(self, metrics: Metrics):
        self._down: dict[str, tuple[float, int]] = {}
        self._began = metrics.cast_outages.labels("began")
        self._ended = metrics.cast_outages.labels("ended")

    def observe(self, account: str, error: CastError | None) -> tuple[int, str]:
        """Record the outcome of one send through `account` (`error` None: Cast took it); the
        level for that attempt's retry line and a note to append to it."""
        down = self._down.get(account)
        if error is None or not is_outage(error):
            if down is not None:
                del self._down[account]
                self._ended.inc()
                log.info(
                    "Cast answers account %s again after %d failed attempt(s) over %.0fs",
                    account,
                    down[1],
                    time.monotonic() - down[0],
                )
            return logging.WARNING, ""
        if down is not None:
            self._down[account] = (down[0], down[1] + 1)
            return logging.DEBUG, ""
        self._down[account] = (time.monotonic(), 1)
        self._began.inc()
        note = (
            f"; Cast unavailable to account {account}: its next failed attempts are logged at "
            "debug until Cast answers"
        )
        return logging.WARNING, note

"""The report step: a message's status, reported to GHL (``pending``, then the final one).

Guarantees:
- A sent message is reported ``pending`` (then polled), a decided one ``delivered`` or
  ``failed`` with its error code and reason (then finished).
- A report GHL may take later (a retryable GHL error, a token that cannot be had for now, or
  GHL's 403 "No conversation provider", which it answers for a few seconds after the webhook) is
  retried with ``REPORT_RETRY`` backoff until ``delivery.report_deadline`` after its first try;
  each try (GHL's own retries included) gets at most ``REPORT_ATTEMPT``, so a location whose
  calls fail cannot hold the report workers. A report refused for good, or not taken by the
  deadline, is logged (error) and counted; the message goes on (``pending``: to its polls; a
  final status: finished).
- One PUT instead of two when it can be: a ``pending`` report finds the location's GHL window
  full waits in the timer heap, not in a worker; a message whose final status is known before
  its ``pending`` PUT has left (GHL's window for the location was full, the report was waiting for a
  retry, or the receipt came back fast) is reported only with its final status; each PUT saved so
  is counted (``castghld_ghl_status_puts_saved_total``). A ``pending`` PUT under way when the
  final status is decided is followed by the final one, never by the polls.
- Whether a status was reported is kept in memory only: after a restart a message not finished
  yet reports its status again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from castghld.config import Config
from castghld.ghl import GHLClient, GHLError, TokenUnavailable
from castghld.metrics import Metrics
from castghld.outbox import Outbox
from castghld.pacing import retry_delay
from castghld.records import OutboundRecord, Stage, log_context
from castghld.scheduler import Step, StepScheduler
from castghld.tokens import Installations

log = logging.getLogger("castghld.outbound")

NO_PROVIDER = "no conversation provider"
# Back-off (base, cap) of a GHL report that failed transiently.
REPORT_RETRY = (5.0, 300.0)
# One report's GHL call (its own retries included) before the worker moves on to the next
# message and the report waits in the timer heap: a location whose GHL calls fail cannot hold
# the report workers for the whole `report_deadline`.
REPORT_ATTEMPT = 60.0

# OutboundDelivery.finish(rid, outcome, reason): forget the message and log its outcome.
Finish = Callable[[str, str, str], Coroutine[Any, Any, None]]


def _is_no_provider(error: GHLError) -> bool:
    return error.status == 403 and NO_PROVIDER in error.message.lower()


class ReportStep:
    """Reports a record's status to GHL (`report`, see the module docstring). `next_step(rid)`
    queues a record reported ``pending`` for its polls; `finish(rid, outcome, reason)` ends one
    whose final status was reported."""

    def __init__(
        self,
        config: Config,
        ghl: GHLClient,
        installations: Installations,
        metrics: Metrics,
        scheduler: StepScheduler,
        next_step: Callable[[str], None],
        finish: Finish,
    ):
        self.config = config
        self.ghl = ghl
        self.installations = installations
        self.scheduler = scheduler
        self.outbox: Outbox | None = None
        self._next_step = next_step
        self._finish = finish
        # Metric children looked up once, not per message.
        self._statuses = {
            s: metrics.statuses.labels(s)
            for s in ("pending", "delivered", "failed", "report_failed")
        }
        self._puts_saved = metrics.status_puts_saved

    async def report(self, rid: str) -> None:
        """Report (`Step.REPORT`) ``pending`` (then poll) or the final status (then finish)."""
        assert self.outbox is not None
        record = self.outbox.records[rid]
        if record["stage"] == Stage.SENT:
            status, error = "pending", None
            wait = self.ghl.limiters.get(record["location_id"]).delay()
            if wait > 0:
                # The location's GHL window is full: ``pending`` waits outside a worker, and
                # gives way to the final status if the receipt comes first.
                self.scheduler.later(wait + random.uniform(0, 0.1), rid, Step.REPORT)
                return
        else:
            status, error = record["status"], _error_of(record)
        now = time.time()
        since = record.get("report_since")
        if since is None:
            since = now
            self.outbox.note(rid, report_since=since)
        end = since + self.config.delivery.report_deadline
        outcome = await self._put_status(record, status, error, min(end, now + REPORT_ATTEMPT))
        if outcome is None and time.time() < end:
            failures = record.get("report_failures", 0)
            self.outbox.note(rid, report_failures=failures + 1)
            self.scheduler.later(retry_delay(failures, None, *REPORT_RETRY), rid, Step.REPORT)
            return
        if outcome is None:
            self._statuses["report_failed"].inc()
            log.error(
                "cannot report %s to GHL for %s before the report deadline",
                status,
                log_context(record),
            )
        if status == "pending":
            self._after_pending(rid)
            return
        if record.get("cast_id") and not record.get("pending_reported"):
            self._puts_saved.inc()  # the final status was known before ``pending`` could leave
        reason = f"{error['code']}: {error['message']}" if error else ""
        await self._finish(rid, status, reason)

    def _after_pending(self, rid: str) -> None:
        """``pending`` was reported (or given up on): on to the receipt, unless a sweep decided
        the final status while the PUT was under way; then that one is reported next."""
        assert self.outbox is not None
        self.outbox.note(rid, pending_reported=True, report_since=None, report_failures=0)
        if self.outbox.records[rid]["stage"] == Stage.REPORT:
            self.scheduler.queue(Step.REPORT, rid)
            return
        self.outbox.note(rid, stage=Stage.POLLING)
        self._next_step(rid)

    async def _put_status(
        self, record: OutboundRecord, status: str, error: dict[str, str] | None, deadline: float
    ) -> bool | None:
        """True once GHL took the status, False if it refused it for good, None if it may take
        it later (a transient failure: retry). `deadline` is wall clock."""
        body: dict[str, Any] = {"status": status}
        if status == "failed" and error:
            body["error"] = error
        path = f"/conversations/messages/{quote(record['message_id'], safe='')}/status"
        context = log_context(record)
        try:
            await self.ghl.call(
                self.installations,
                record["location_id"],
                "PUT",
                path,
                json_body=body,
                deadline=time.monotonic() + (deadline - time.time()),
                retry_if=_is_no_provider,
                context=context,
            )
        except TokenUnavailable as e:
            if e.retryable:
                return None
            self._statuses["report_failed"].inc()
            log.error("cannot report %s to GHL for %s: %s", status, context, e)
            return False
        except GHLError as e:
            if e.retryable or _is_no_provider(e):
                return None
            self._statuses["report_failed"].inc()
            log.error("cannot report %s to GHL for %s: %s", status, context, e)
            return False
        self._statuses[status].inc()
        log.debug("reported %s to GHL for %s", status, context)
        return True


def _error_of(record: OutboundRecord) -> dict[str, str] | None:
    if record.get("error_code"):
        return _error(record["error_code"], record.get("error_reason") or "")
    legacy = record.get("error")  # journaled by an older version
    return dict(legacy) if isinstance(legacy, dict) else None


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "type": "saas", "message": message}

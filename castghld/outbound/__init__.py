"""Outbound SMS: a GHL ``ProviderOutboundMessage`` from the outbox to Cast, and its status to GHL.

`OutboundDelivery` is the outbox's `Scheduler` for outbound records. It holds a record's id from
dispatch to finish and queues it for the step its stage calls for (`_queue_next_step`); the
steps run on a `StepScheduler` (castghld.scheduler: the per-account send lanes, the poll and
report workers, the timer heap of retries and polls). Where each part lives:
- castghld.records: the record's fields (`OutboundRecord`) and stages (``new`` -> ``sent`` ->
  ``polling`` -> ``report`` -> finished).
- send.py, `SendStep`: one Cast attempt; exactly one SMS (the idempotency key); which Cast
  answers are retried (429, 500, 502, 503, 504, no answer) and with what backoff; the send
  deadline and the 23 h resend window.
- refusals.py, `AccountRefusals` (`SendStep`'s base): a refusal about the Cast account pauses it;
  the message waits, or fails with the account's reason when its send deadline passes.
- sweep.py, `ReceiptSweep`: receipts by the page, from Cast's logs per account, while a
  message waits for its receipt (from ``sent`` on, so a fast receipt saves the ``pending`` PUT).
- receipt.py, `ReceiptStep`: Cast's delivery status of one message, polled on
  ``delivery.status_polls``, for what the sweeps cannot resolve.
- report.py, `ReportStep`: the ``pending`` and final statuses reported to GHL.
- castghld.accounts, `AccountStates`: Cast accounts paused by an account-level refusal, their
  probe and resume; here, the lane a paused account's messages wait in and their deadline.
- departed.py, `DepartedLocations` (`OutboundDelivery`'s base): ending the messages of a
  location that left.
- here: which step a stage calls for, and finishing a message.

Guarantees:
- The journal holds what a restart needs, nothing more: ``put`` (at ack time), ``attempted``
  with the Cast account and sender ID (durable before the first request may leave), ``sent``
  with Cast's message id, a ``report`` decided after an attempt, and ``done``. Reporting
  ``pending``, each poll or sweep and a final delivery status are kept in memory only: a restart
  reports ``pending`` again, sweeps or polls again (Cast answers the same) and decides again; a
  message refused before any attempt (invalid number, expired) is refused again the same way.
- One ``info`` line per message outcome (`OutboundDelivery.finish`), with ``message_id``,
  ``location_id``, ``cast_id``, ``outcome`` and ``reason`` as structured fields. A final failure
  also logs what happened (see send.py and receipt.py); Cast's texts have numbers redacted.
- A step that raises unexpectedly does not lose the message: it goes on from its stage after a
  pause (`Step.RESUME`), or at the next start.
- A location that left (UNINSTALL, ``castghld forget``, marked uninstalled by reconciliation;
  `Installations.on_departed`) is not texted for again: its messages waiting to be sent are
  dropped, and those already sent are finished without their GHL report (there is no token to
  make it with), all in one journal write (``done`` entries: a restart does not bring them back),
  with one warning line (counts, location, reason) and
  ``castghld_outbound_dropped_total{reason="location_uninstalled", stage="unsent"|"sent"}``.
  A message whose step is running at that instant is left to it: a send waiting for its pacing
  slot asks again at the instant its request would leave and is dropped then; a request that
  already left completes (Cast has it) and its report is skipped. Every step also checks the
  location before it runs: a message met after that (a race with the drop, a restart) ends the
  same way, counted, with its own ``info`` line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import Any

from castghld.accounts import AccountStates, Pause
from castghld.cast import CastClient
from castghld.config import Config
from castghld.ghl import GHLClient
from castghld.metrics import Metrics
from castghld.outbound.departed import DEPARTED, DepartedLocations
from castghld.outbound.receipt import ReceiptStep
from castghld.outbound.report import ReportStep
from castghld.outbound.send import SendStep, account_of
from castghld.outbound.sweep import ReceiptSweep
from castghld.outbox import Outbox
from castghld.records import (
    KIND,
    OutboundRecord,
    Stage,
    log_context,
    new_record,
    record_id,
    sms_text,
)
from castghld.scheduler import Step, StepScheduler
from castghld.tokens import Installations
from castghld.usage import UsageLedger, charged_parts

# The record (fields, stages, how one is made) is defined in castghld.records; its names stay
# importable from here.
__all__ = [
    "KIND",
    "POLL_WORKERS",
    "REPORT_WORKERS",
    "SENDERS_PER_ACCOUNT",
    "OutboundDelivery",
    "new_record",
    "record_id",
    "sms_text",
]

log = logging.getLogger("castghld.outbound")

# Workers: sends per Cast account (10 msg/s at up to ~0.8 s per answer), polls, GHL reports.
SENDERS_PER_ACCOUNT = 8
POLL_WORKERS = 8
REPORT_WORKERS = 16


class OutboundDelivery(DepartedLocations):
    """The outbox's scheduler of outbound records (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        cast: CastClient,
        ghl: GHLClient,
        installations: Installations,
        metrics: Metrics,
        usage: UsageLedger | None = None,
    ):
        self._config = config
        self.cast = cast
        self.ghl = ghl
        self.installations = installations
        self.metrics = metrics
        self.usage = usage
        self.outbox: Outbox | None = None
        self.scheduler = StepScheduler(self._live, self._due, log)
        next_step = self._queue_next_step
        self.sends = SendStep(
            config, cast, metrics, self.scheduler, next_step, self._installed, self.end_departed
        )
        self.sends.on_sent = self._charged
        self.receipts = ReceiptStep(config, cast, self.scheduler, next_step, self.finish)
        self.sweeps = ReceiptSweep(cast, self.scheduler, self.receipts)
        self.reports = ReportStep(
            config, ghl, installations, metrics, self.scheduler, next_step, self.finish
        )
        self.accounts = AccountStates(
            cast, metrics, self.scheduler, self._expire_paused, self.spawn
        )
        self.sends.accounts = self.accounts
        self.scheduler.serve(Step.SEND, self._unless_departed(self.sends.send), SENDERS_PER_ACCOUNT)
        self.scheduler.serve(Step.POLL, self._unless_departed(self.receipts.poll), POLL_WORKERS)
        self.scheduler.serve(
            Step.REPORT, self._unless_departed(self.reports.report), REPORT_WORKERS
        )
        self._dropped = {
            stage: metrics.outbound_dropped.labels(DEPARTED, stage) for stage in ("unsent", "sent")
        }

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A reload's config reaches every step: `Daemon.config_holders` lists only this front."""
        self._config = config
        self.sends.config = self.receipts.config = self.reports.config = config

    # -- the Scheduler protocol ----------------------------------------------------------------

    def start(self, outbox: Outbox) -> None:
        self._use(outbox)
        if outbox.restarted:
            self.cast.quiet_start()

    def dispatch(self, outbox: Outbox, rid: str) -> None:
        if not self.scheduler.hold(rid):
            return
        self._use(outbox)
        self._queue_next_step(rid)

    def holds(self, rid: str) -> bool:
        return self.scheduler.holds(rid)

    @property
    def active(self) -> int:
        return self.scheduler.active

    async def wait_idle(self) -> None:
        await self.scheduler.wait_idle()

    async def stop(self) -> None:
        """Stop the workers where they are; the records stay in the outbox for the next start."""
        await self.scheduler.stop()
        self.sweeps.clear()

    # -- queues --------------------------------------------------------------------------------

    def _use(self, outbox: Outbox) -> None:
        """The outbox whose records the steps read and write."""
        if outbox is not self.outbox:
            self.outbox = self.sends.outbox = self.receipts.outbox = outbox
            self.reports.outbox = self.sweeps.outbox = outbox

    def _record(self, rid: str) -> OutboundRecord | None:
        assert self.outbox is not None
        record = self.outbox.records.get(rid)
        if record is None:  # finished or dropped meanwhile (castghld outbox drop)
            self.scheduler.release(rid)
        return record

    def _live(self, rid: str) -> bool:
        assert self.outbox is not None
        return rid in self.outbox.records

    def _queue_next_step(self, rid: str, front: bool = False) -> None:
        """Queue `rid` for the step its stage calls for: ``new`` to its Cast account's send lane
        (`front`: a send retry, it has waited longest), ``sent`` and ``report`` to a GHL report,
        ``sent`` and ``polling`` also to its account's receipt sweeps, or else (``polling``) to
        its next status poll."""
        record = self._record(rid)
        if record is None:
            return
        stage = record["stage"]
        if stage == Stage.NEW:
            self.scheduler.queue_send(rid, self.lane_name(record), front)
        elif stage == Stage.SENT:
            self.scheduler.queue(Step.REPORT, rid)
            self.sweeps.take(rid, record)
        elif stage == Stage.REPORT:
            self.scheduler.queue(Step.REPORT, rid)
        elif stage == Stage.POLLING:
            if not self.sweeps.take(rid, record):
                self.receipts.schedule(rid, record)
        else:  # Stage.UNDECIDED, written by an older version once its polls were used up
            self.scheduler.spawn(self.finish(rid, "pending", "no delivery report"))

    def _due(self, rid: str, step: str) -> None:
        """A due timer entry no pool serves: a send retry (`Step.SEND`), or a record whose step
        raised (`Step.RESUME`): both go on from their stage."""
        self._queue_next_step(rid, front=step == Step.SEND)

    def lane_name(self, record: OutboundRecord) -> str:
        """The name of the Cast account the message's next attempt goes through."""
        if record.get("attempted") and "account" in record:
            account = account_of(self.cast, record)
            return account.name if account is not None else record["account"]
        return self.cast.account_for(record["location_id"]).name

    # -- usage -----------------------------------------------------------------------------

    def _charged(self, record: OutboundRecord, account: str, answer: dict[str, Any]) -> None:
        """Cast accepted a send: count the parts it charged (its answer's ``parts``; a sandbox
        answer charges none) in the metrics and the usage ledger."""
        parts = charged_parts(answer)
        self.metrics.parts_charged.labels(account).inc(parts)
        if self.usage is not None:
            self.usage.count_sent(record["location_id"], account, parts, time.time())

    def _count_outcome(self, record: OutboundRecord, outcome: str) -> None:
        if self.usage is None or outcome not in ("delivered", "failed"):
            return
        account = record.get("account") or self.lane_name(record)
        sent_at = record.get("sent_at") if record.get("cast_id") else None
        self.usage.count_outcome(record["location_id"], account, outcome, sent_at)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.scheduler.spawn(coroutine)

    # -- paused accounts -----------------------------------------------------------------------

    def _expire_paused(self, name: str, pause: Pause) -> float | None:
        """Fail the messages of the paused account `name` whose send deadline passed; seconds
        until the next one's (None: none waits). The lane is in arrival order, retries at its
        head: the scan stops at the first message not due, so it costs what it takes out, and a
        later one out of order is failed by a later scan (never before its deadline)."""
        if self.outbox is None:
            return None
        now = time.time()
        head = 0
        next_due = None
        for rid in self.scheduler.lane_ids(name):
            record = self.outbox.records.get(rid)
            if record is not None:
                left = self.sends.not_after(record) - now
                if left > 0:
                    next_due = max(left, 1.0)
                    break
            head += 1
        due = []
        for rid in self.scheduler.take_head(name, head):
            if rid in self.outbox.records:
                due.append(rid)
            else:  # finished or dropped meanwhile
                self.scheduler.release(rid)
        if due:
            log.error(
                "%d message(s) waiting on paused Cast account %s reached their send deadline: "
                "reported failed (%s)",
                len(due),
                name,
                pause.reason,
                extra={"account": name, "reason": pause.code, "outcome": "failed"},
            )
            for rid in due:
                self.scheduler.spawn(self.sends.expire(rid, pause))
        return next_due

    # -- the end -------------------------------------------------------------------------------

    async def finish(self, rid: str, outcome: str, reason: str) -> None:
        """Forget the message (its id stays seen) and log its outcome: one line per message."""
        assert self.outbox is not None
        record = self.outbox.records.get(rid)
        if record is not None:
            log.info(
                "outbound %s %s%s%s",
                outcome,
                log_context(record),
                " cast_id=" + record["cast_id"] if record.get("cast_id") else "",
                " reason=" + reason if reason else "",
                extra={
                    "message_id": record["message_id"],
                    "location_id": record["location_id"],
                    "cast_id": record.get("cast_id"),
                    "outcome": outcome,
                    "reason": reason,
                },
            )
            self._count_outcome(record, outcome)
            await self.outbox.finish(rid)
        self.scheduler.release(rid)

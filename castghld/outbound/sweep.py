"""Receipts by the page: Cast's message logs read per account, instead of one lookup per message.

A sent message waits for its carrier receipt. Cast's ``GET /api/v1/sms/logs`` (SPEC §5) answers
up to ``PAGE`` of an account's messages per request, newest first, each with
``smpp_message_id`` (the send's ``message_id``) and, once it arrived, ``dlr_status``. A
`ReceiptSweep` keeps, per Cast account, the messages waiting for a receipt and reads those pages
on a cadence: one request finishes hundreds of messages, where lookups cost one each.

Guarantees:
- Sweeps run only while messages wait: every ``CADENCE`` seconds while the youngest one was
  sent recently (a campaign), slower for old stragglers, none when nothing waits. Each sweep
  reads from ``from``/``to`` = the days (UTC and Philippine time) from the oldest waiting message
  to now, ``limit`` ``PAGE``, paging by ``offset`` until it has passed the oldest message it waits
  for (seen it, or a short page), at most ``MAX_PAGES`` pages.
- Every waiting message whose receipt is in the pages read is decided as a lookup would decide it
  (`ReceiptStep.decide`): ``DELIVRD`` -> ``delivered``; ``UNDELIV``, ``REJECTD``, ``EXPIRED``,
  ``DELETED`` or a failed submission -> ``failed``; anything else waits on.
- Falls back to the per-message lookups of receipt.py (``delivery.status_polls``, from the
  message's send time): a message that ``MISSES_BEFORE_LOOKUP`` complete sweeps did not find, or
  still unresolved ``SWEEP_PATIENCE`` after its send; and every message of an account whose logs
  endpoint answers 400/404/405/422 or something that is not Cast's shape (for ``LOGS_RECHECK``,
  then the logs are tried again). Other errors (429, 5xx, no answer, 401/402/403) only wait for
  the next sweep, and ``SWEEP_PATIENCE`` still applies. Each sweep reads with the account's
  current key (a reload may have replaced the one it had when its messages were sent).
- The logs carry message text and numbers: only ``smpp_message_id``, ``status`` and
  ``dlr_status`` are read, the rest is dropped with the page; nothing of a page is logged,
  journaled or kept.
- Crash-safe by construction: what a sweep decides is kept in memory only, like a lookup's
  (the journal holds ``sent``), so a kill -9 during or after a sweep loses no receipt: the next
  start reports ``pending`` again and sweeps (Cast's logs answer the same).
- Sweep requests yield to sends in Cast's per-IP budget (castghld.priority).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

from castghld.cast import CastAccount, CastClient, CastError, answer_summary
from castghld.outbound.receipt import ReceiptStep
from castghld.outbound.send import account_of
from castghld.outbox import Outbox
from castghld.records import OutboundRecord, Stage
from castghld.scheduler import StepScheduler

log = logging.getLogger("castghld.outbound")

PAGE = 500  # Cast's largest page
MAX_PAGES = 20  # per sweep: 10,000 of the account's newest messages
# (the youngest waiting message sent less than this long ago, sweep every this many seconds)
CADENCE = ((120.0, 2.0), (900.0, 15.0))
STRAGGLER_CADENCE = 60.0
SWEEP_PATIENCE = 1800.0
MISSES_BEFORE_LOOKUP = 3
LOGS_RECHECK = 3600.0
# Answers that say this Cast has no usable logs endpoint (or not for our query).
NO_LOGS = frozenset({400, 404, 405, 422})
DELIVERED = frozenset({"DELIVRD", "DELIVERED"})
UNDELIVERED = frozenset({"UNDELIV", "UNDELIVERED", "REJECTD", "REJECTED", "EXPIRED", "DELETED"})
PH_TIME = datetime.timezone(datetime.timedelta(hours=8))


class _Account:
    """One Cast account's waiting messages (Cast id -> record id) and its sweep's state."""

    __slots__ = ("account", "logs_off_until", "probed", "running", "waiting")

    def __init__(self, account: CastAccount):
        self.account = account
        self.waiting: dict[str, str] = {}
        self.running = False
        self.probed = False  # whether a sweep has shown the logs endpoint answers
        self.logs_off_until = 0.0


class ReceiptSweep:
    """Sweeps of Cast's logs per account (see the module docstring). `receipts` decides what a
    sweep finds and takes back what it gives up on."""

    def __init__(self, cast: CastClient, scheduler: StepScheduler, receipts: ReceiptStep):
        self.cast = cast
        self.scheduler = scheduler
        self.receipts = receipts
        self.outbox: Outbox | None = None
        self._accounts: dict[str, _Account] = {}

    def take(self, rid: str, record: OutboundRecord) -> bool:
        """Watch the sent message `rid` for its receipt; False if per-message lookups must."""
        if record.get("swept_out") or not record.get("cast_id"):
            return False
        account = account_of(self.cast, record)
        if account is None:
            return False
        state = self._accounts.get(account.name)
        if state is None:
            state = self._accounts[account.name] = _Account(account)
        if state.logs_off_until > time.monotonic():
            return False
        if state.waiting.setdefault(record["cast_id"], rid) != rid:
            return False  # Cast gave this id to another waiting message too: looked up alone
        if not state.running and not self.scheduler.stopping:
            state.running = True
            self.scheduler.spawn(self._run(state))
        return True

    def clear(self) -> None:
        """Forget every waiting message (the scheduler stopped; the next start brings them)."""
        self._accounts.clear()

    # -- the cadence ---------------------------------------------------------------------------

    async def _run(self, state: _Account) -> None:
        try:
            # The first sweep of an account learns right away whether its logs can be read.
            delay = CADENCE[0][1] if state.probed else 0.0
            while True:
                await asyncio.sleep(delay)
                if not self._prune(state):
                    return
                await self._sweep(state)
                if not self._prune(state):
                    return
                delay = self._cadence(state)
        finally:
            state.running = False

    def _prune(self, state: _Account) -> bool:
        """Drop what no longer waits (finished, dropped, decided); whether anything still does."""
        assert self.outbox is not None
        records = self.outbox.records
        for cast_id, rid in list(state.waiting.items()):
            record = records.get(rid)
            if (
                record is None
                or record.get("cast_id") != cast_id
                or record["stage"] not in (Stage.SENT, Stage.POLLING)
                or record.get("status")
            ):
                del state.waiting[cast_id]
        return bool(state.waiting) and not self.scheduler.stopping

    def _cadence(self, state: _Account) -> float:
        assert self.outbox is not None
        records = self.outbox.records
        youngest = max(records[rid]["sent_at"] for rid in state.waiting.values())
        age = time.time() - youngest
        for younger_than, every in CADENCE:
            if age < younger_than:
                return every
        return STRAGGLER_CADENCE

    # -- one sweep -----------------------------------------------------------------------------

    async def _sweep(self, state: _Account) -> None:
        """Read pages until past the oldest waiting message; decide what is there."""
        assert self.outbox is not None
        records = self.outbox.records
        started = time.time()
        asked = dict(state.waiting)
        oldest_id = min(asked, key=lambda cast_id: records[asked[cast_id]]["sent_at"])
        first_day, last_day = _days(records[asked[oldest_id]]["sent_at"] - 60.0, started)
        found: set[str] = set()
        complete = False
        # The account's key now: a reload may have replaced (and Cast revoked) the one it had.
        current = self.cast.stored_account(state.account.name, state.account.sender_id)
        if current is not None:
            state.account = current
        for page in range(MAX_PAGES):
            try:
                answer = await self.cast.logs(state.account, first_day, last_day, PAGE, page * PAGE)
            except CastError as e:
                if e.http_status in NO_LOGS or (e.code == "BAD_ANSWER" and e.http_status < 500):
                    self._logs_unusable(
                        state, f"Cast answered {answer_summary(e.http_status, e.code)}"
                    )
                else:
                    log.warning(
                        "receipt sweep of %s: Cast %d %s; next sweep on its cadence",
                        state.account.name,
                        e.status,
                        e.code,
                    )
                    self._give_up_on_missed(state, asked, found, False, started)
                return
            entries = _entries(answer)
            del answer
            if entries is None:
                self._logs_unusable(state, "the logs answer is not in Cast's shape")
                return
            state.probed = True
            for cast_id, receipt in entries:
                rid = state.waiting.get(cast_id)
                if rid is None or rid not in records:
                    continue
                found.add(cast_id)
                if receipt is not None and self.receipts.decide(rid, receipt):
                    del state.waiting[cast_id]
            if oldest_id in found or len(entries) < PAGE:
                complete = True
                break
        self._give_up_on_missed(state, asked, found, complete, started)

    def _give_up_on_missed(
        self, state: _Account, asked: dict[str, str], found: set[str], complete: bool, at: float
    ) -> None:
        """Messages a complete sweep did not find (``MISSES_BEFORE_LOOKUP`` times), or waiting
        longer than ``SWEEP_PATIENCE``, go to per-message lookups."""
        assert self.outbox is not None
        records = self.outbox.records
        for cast_id, rid in asked.items():
            record = records.get(rid)
            if record is None or state.waiting.get(cast_id) != rid:
                continue
            if at - record["sent_at"] > SWEEP_PATIENCE:
                self._fall_back(state, cast_id, rid)
            elif complete and cast_id not in found:
                misses = record.get("sweep_misses", 0) + 1
                self.outbox.note(rid, sweep_misses=misses)
                if misses >= MISSES_BEFORE_LOOKUP:
                    self._fall_back(state, cast_id, rid)

    def _logs_unusable(self, state: _Account, why: str) -> None:
        # Info, not a warning: receipts still arrive (by lookups), at a higher request cost.
        log.info(
            "Cast logs of %s cannot be read (%s): per-message status lookups for %.0fs",
            state.account.name,
            why,
            LOGS_RECHECK,
        )
        state.logs_off_until = time.monotonic() + LOGS_RECHECK
        state.probed = False
        for cast_id, rid in list(state.waiting.items()):
            self._fall_back(state, cast_id, rid)

    def _fall_back(self, state: _Account, cast_id: str, rid: str) -> None:
        """Hand `rid` to per-message lookups: now if it waits for them (stage ``polling``), or
        once its ``pending`` report is done (stage ``sent``; ``take`` then refuses it)."""
        assert self.outbox is not None
        del state.waiting[cast_id]
        self.outbox.note(rid, swept_out=True)
        record = self.outbox.records[rid]
        if record["stage"] == Stage.POLLING:
            self.receipts.schedule(rid, record)


def _days(oldest: float, now: float) -> tuple[str, str]:
    """``from`` and ``to`` covering `oldest`..`now` in UTC and in Philippine time (Cast's)."""
    days = [
        datetime.datetime.fromtimestamp(moment, zone).date()
        for moment in (oldest, now)
        for zone in (datetime.timezone.utc, PH_TIME)
    ]
    return min(days).isoformat(), max(days).isoformat()


def _entries(answer: Any) -> list[tuple[str, dict[str, str] | None]] | None:
    """(Cast id, receipt or None) of each entry of a logs answer; None if it is not Cast's
    shape. Only the receipt fields are read; text and numbers stay in the answer, dropped."""
    logs = answer.get("logs") if isinstance(answer, dict) else None
    if not isinstance(logs, list):
        return None
    entries = []
    for entry in logs:
        if not isinstance(entry, dict):
            return None
        if isinstance(entry.get("smpp_message_id"), str):  # none for a failed submission
            entries.append((entry["smpp_message_id"], _receipt(entry)))
    return entries


def _receipt(entry: dict[str, Any]) -> dict[str, str] | None:
    """A lookup-shaped final status from a log entry, or None while there is no receipt."""
    if entry.get("status") == "failed":
        return {"status": "failed", "dlr_status": "FAILED"}
    dlr = entry.get("dlr_status")
    if not isinstance(dlr, str):
        return None
    dlr = dlr.strip().upper()
    if dlr in DELIVERED:
        return {"status": "delivered"}
    if dlr in UNDELIVERED:
        return {"status": "undelivered", "dlr_status": dlr}
    return None

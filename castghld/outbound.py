"""Outbound SMS: a GHL ``ProviderOutboundMessage`` from the outbox to Cast, and its status to GHL.

Work that waits is data. `OutboundDelivery` is the outbox's `Scheduler` for outbound records:
- a message to send waits in its Cast account's FIFO (``_Lane.ready``), served by at most
  ``SENDERS_PER_ACCOUNT`` workers of that account that exist only while it has work: a busy
  account never holds up another (they share only ``delivery.concurrency`` and the per-IP pace);
- a send retry, a status poll or a report retry waits as a ``(due, seq, rid, step)`` tuple in one
  timer heap; one IOLoop timer moves due entries to their queue;
- status polls and GHL reports are served by ``POLL_WORKERS`` and ``REPORT_WORKERS`` workers.
Nothing is parked per message: 100k waiting messages are 100k small records of atomic values
and queue entries (untracked by the GC) and a few dozen coroutines.

Stages: ``new`` -> (send through Cast) -> ``sent`` -> (report ``pending``) -> ``polling`` -> (poll
Cast's delivery status) -> ``report`` -> (report the final status) -> finished. A message we
cannot send goes ``new`` -> ``report`` with status ``failed`` and a reason.

The journal holds what a restart needs, nothing more: ``put`` (at ack time), ``attempted`` with
the Cast account and sender ID (durable before the first request may leave), ``sent`` with Cast's
message id, a ``report`` decided after an attempt, and ``done``. Reporting ``pending``, each poll
and a final delivery status are kept in memory only: a restart reports ``pending`` again, polls
again (Cast answers the same) and decides again; a message refused before any attempt (invalid
number, expired) is refused again the same way.

Why ``attempted`` is its own entry and not implied by ``put``: a message never attempted and
older than ``delivery.send_deadline`` after a restart must be reported ``EXPIRED``, not texted
late; one attempted must be resent (same key) to learn its outcome. Folding the two would text
the unattempted tail of a backlog late after a long outage. The entry shares the group commit's
fsync with whatever else is being written.

Exactly one SMS: every send carries ``X-Idempotency-Key`` = GHL ``messageId`` through the account
of its first attempt (stored on the record: a config change cannot move the key to another
account's scope), including the one after a crash between Cast's answer and the ``sent`` entry;
Cast replays its first answer for 24 h. Both windows are checked at the instant the request would
leave, after pacing: a message never attempted within ``send_deadline`` is reported ``failed``
(``EXPIRED``) instead of sent late, and one attempted before a restart but still unresolved 23 h
after it arrived is reported ``failed`` (``OUTCOME_UNKNOWN``) rather than risked.

Never stuck "pending" silently: only polls Cast answered use up the ``status_polls`` schedule (a
status outage is retried with backoff), a message still undecided after the last one is logged.
One ``info`` line per message outcome, with ``message_id``, ``location_id``, ``cast_id``,
``outcome`` and ``reason`` as structured fields. A final failure also logs what happened: ``Cast
refused`` (error) only for Cast's final refusals, ``gave up on`` (error) when retries ran out or
the send deadline passed, ``Cast reported undelivered|failed`` (warning) with Cast's
``dlr_status`` and text; Cast's texts have numbers redacted.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from castghld.cast import (
    MAX_MESSAGE_CHARS,
    PROVIDER_ERROR_RETRIES,
    CastAccount,
    CastClient,
    CastError,
    SendWindowClosed,
    worth_retrying,
)
from castghld.config import Config
from castghld.ghl import GHLClient, GHLError, TokenUnavailable
from castghld.log import redact_numbers
from castghld.metrics import Metrics
from castghld.outbox import PIPELINE_RETRY, Outbox, Record
from castghld.pacing import retry_delay
from castghld.phone import InvalidNumber, normalize_mobile
from castghld.tokens import Installations

log = logging.getLogger("castghld.outbound")

KIND = "outbound"
FINAL_STATUSES = {"delivered": "delivered", "undelivered": "failed", "failed": "failed"}
NO_PROVIDER = "no conversation provider"
# Cast replays the answer to an idempotency key for 24 h: a retry younger than this is safe.
SAFE_RESEND_AGE = 23 * 3600.0
# How long after the last scheduled poll a Cast status outage is waited out.
POLL_OUTAGE_LIMIT = 24 * 3600.0
# Back-off (base, cap) of a send, a status poll and a GHL report that failed transiently.
SEND_RETRY = (1.0, 300.0)
POLL_RETRY = (0.5, 300.0)
REPORT_RETRY = (5.0, 300.0)
# One report's GHL call (its own retries included) before the worker moves on to the next
# message and the report waits in the timer heap: a location whose GHL calls fail cannot hold
# the report workers for the whole `report_deadline`.
REPORT_ATTEMPT = 60.0
# Workers: sends per Cast account (10 msg/s at up to ~0.8 s per answer), polls, GHL reports.
SENDERS_PER_ACCOUNT = 8
POLL_WORKERS = 8
REPORT_WORKERS = 16

# What a timer-heap entry does when due.
_SEND, _POLL, _REPORT, _ROUTE = range(4)


def record_id(message_id: str) -> str:
    return "out:" + message_id


def new_record(payload: dict[str, Any]) -> Record:
    """The outbox record of an authentic, well-formed webhook (fields validated by the handler)."""
    return {
        "kind": KIND,
        "stage": "new",
        "message_id": payload["messageId"],
        "location_id": payload["locationId"],
        "type": payload.get("type", "SMS"),
        "phone": payload.get("phone") or "",
        "message": payload.get("message") or "",
        "attachments": tuple(payload.get("attachments") or ()),
        "received_at": time.time(),
    }


def sms_text(record: Record) -> str:
    """The message with attachment URLs appended, one per line (Cast has no MMS)."""
    parts = [record["message"]] if record["message"] else []
    parts += record["attachments"]
    return "\n".join(parts)


def _is_no_provider(error: GHLError) -> bool:
    return error.status == 403 and NO_PROVIDER in error.message.lower()


def _context(record: Record) -> str:
    return f"message={record['message_id']} location={record['location_id']}"


class _Lane:
    """One Cast account's messages ready to send, FIFO, and how many workers serve them."""

    __slots__ = ("ready", "workers")

    def __init__(self) -> None:
        self.ready: collections.deque[str] = collections.deque()
        self.workers = 0


class OutboundDelivery:
    """The outbox's scheduler of outbound records (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        cast: CastClient,
        ghl: GHLClient,
        installations: Installations,
        metrics: Metrics,
    ):
        self.config = config
        self.cast = cast
        self.ghl = ghl
        self.installations = installations
        self._regions: tuple[tuple[str, ...], frozenset[str] | None] = ((), None)
        self.outbox: Outbox | None = None
        self.stopping = False
        self._held: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lanes: dict[str, _Lane] = {}
        self._timers: list[tuple[float, int, str, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._seq = itertools.count()
        self._polls: collections.deque[str] = collections.deque()
        self._reports: collections.deque[str] = collections.deque()
        self._workers = {"poll": 0, "report": 0}
        self._tasks: set[asyncio.Task] = set()
        # Metric children looked up once, not per message.
        self._sends = {o: metrics.sends.labels(o) for o in ("sent", "retry", "failed", "gave_up")}
        self._sends["rejected"] = metrics.sends.labels("rejected")
        self._statuses = {
            s: metrics.statuses.labels(s)
            for s in ("pending", "delivered", "failed", "report_failed")
        }

    @property
    def allowed_regions(self) -> frozenset[str] | None:
        """`delivery.allowed_regions` of the config in force (a reload changes it); None: any."""
        regions = self.config.delivery.allowed_regions
        if regions is not self._regions[0]:
            self._regions = (regions, None if "*" in regions else frozenset(regions))
        return self._regions[1]

    # -- the Scheduler protocol ----------------------------------------------------------------

    def start(self, outbox: Outbox) -> None:
        self.outbox = outbox
        if outbox.restarted:
            self.cast.quiet_start()

    def dispatch(self, outbox: Outbox, rid: str) -> None:
        if self.stopping or rid in self._held:
            return
        self.outbox = outbox
        self._held.add(rid)
        self._idle.clear()
        self._route(rid)

    def holds(self, rid: str) -> bool:
        return rid in self._held

    @property
    def active(self) -> int:
        return len(self._held)

    async def wait_idle(self) -> None:
        while self._held:
            await self._idle.wait()

    async def stop(self) -> None:
        """Stop the workers where they are; the records stay in the outbox for the next start."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for queue in (self._held, self._lanes, self._timers, self._polls, self._reports):
            queue.clear()
        self._idle.set()

    # -- queues --------------------------------------------------------------------------------

    def _record(self, rid: str) -> Record | None:
        assert self.outbox is not None
        record = self.outbox.records.get(rid)
        if record is None:  # finished or dropped meanwhile (castghld outbox drop)
            self._release(rid)
        return record

    def _release(self, rid: str) -> None:
        self._held.discard(rid)
        if not self._held:
            self._idle.set()

    def _route(self, rid: str, front: bool = False) -> None:
        """Queue `rid` for the step its stage calls for."""
        record = self._record(rid)
        if record is None:
            return
        stage = record["stage"]
        if stage == "new":
            name = self._lane_name(record)
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = _Lane()
            if front:  # a retry: it has waited longest
                lane.ready.appendleft(rid)
            else:
                lane.ready.append(rid)
            while not self.stopping and lane.workers < min(len(lane.ready), SENDERS_PER_ACCOUNT):
                lane.workers += 1
                self._spawn(self._send_worker(name, lane))
        elif stage in ("sent", "report"):
            self._reports.append(rid)
            self._wake("report", self._reports, REPORT_WORKERS, self._report_step)
        elif stage == "polling":
            self._schedule_poll(rid, record)
        else:  # "undecided", written by an older version once its polls were used up
            self._spawn(self._finish(rid, "pending", "no delivery report"))

    def _lane_name(self, record: Record) -> str:
        if record.get("attempted") and "account" in record:
            return record["account"]
        return self.cast.account_for(record["location_id"]).name

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake(
        self,
        name: str,
        queue: collections.deque[str],
        limit: int,
        step: Callable[[str], Awaitable[None]],
    ) -> None:
        while not self.stopping and self._workers[name] < min(len(queue), limit):
            self._workers[name] += 1
            self._spawn(self._worker(name, queue, step))

    async def _worker(
        self, name: str, queue: collections.deque[str], step: Callable[[str], Awaitable[None]]
    ) -> None:
        try:
            while queue and not self.stopping:
                await self._guarded(step, queue.popleft())
        finally:
            self._workers[name] -= 1

    async def _send_worker(self, name: str, lane: _Lane) -> None:
        try:
            while lane.ready and not self.stopping:
                await self._guarded(self._send, lane.ready.popleft())
        finally:
            lane.workers -= 1
            if not lane.ready and not lane.workers and self._lanes.get(name) is lane:
                del self._lanes[name]

    async def _guarded(self, step: Callable[[str], Awaitable[None]], rid: str) -> None:
        if self._record(rid) is None:
            return
        try:
            await step(rid)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never lose the message to an unexpected error: it stays in the outbox and goes
            # on from its stage after a pause (or at the next start).
            log.exception("outbound: step failed for %s; retrying in %.0fs", rid, PIPELINE_RETRY[0])
            self._later(PIPELINE_RETRY[0], rid, _ROUTE)

    def _later(self, delay: float, rid: str, step: int) -> None:
        due = time.monotonic() + max(0.0, delay)
        heapq.heappush(self._timers, (due, next(self._seq), rid, step))
        if self._timer is None or due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_due = due
            self._timer = asyncio.get_running_loop().call_at(due, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now and not self.stopping:
            _, _, rid, step = heapq.heappop(self._timers)
            if self._record(rid) is None:
                continue
            if step == _POLL:
                self._polls.append(rid)
                self._wake("poll", self._polls, POLL_WORKERS, self._poll_step)
            elif step == _REPORT:
                self._reports.append(rid)
                self._wake("report", self._reports, REPORT_WORKERS, self._report_step)
            else:
                self._route(rid, front=step == _SEND)
        if self._timers and not self.stopping:
            self._timer_due = self._timers[0][0]
            self._timer = asyncio.get_running_loop().call_at(self._timer_due, self._fire)

    # -- sending -------------------------------------------------------------------------------

    def _check(self, record: Record) -> tuple[str, str] | str:
        """The E.164 number to send to, or (error code, reason) why we cannot send."""
        if record.get("refused"):  # the webhook's fields could not be used (the handler says why)
            return tuple(record["refused"])
        if record["type"] != "SMS":
            return ("UNSUPPORTED_TYPE", f"castghld sends SMS only, not {record['type']}")
        text = sms_text(record)
        if not text.strip():
            return ("EMPTY_MESSAGE", "the message is empty")
        if len(text) > MAX_MESSAGE_CHARS:
            return ("MESSAGE_TOO_LONG", f"{len(text)} characters; Cast takes {MAX_MESSAGE_CHARS}")
        try:
            return normalize_mobile(record["phone"], "PH", self.allowed_regions)
        except InvalidNumber as e:
            return (e.code, e.message)  # not the number itself: logs stay free of personal data

    def _account(self, record: Record) -> CastAccount | None:
        """The account of the first attempt (its idempotency scope, where its Cast id lives)."""
        if "account" in record:
            return self.cast.stored_account(record["account"], record["sender_id"])
        return self.cast.account_for(record["location_id"])

    async def _send(self, rid: str) -> None:
        """One attempt of the message; a retry goes back to the timer heap."""
        assert self.outbox is not None
        outbox = self.outbox
        record = outbox.records[rid]
        checked = self._check(record)
        if isinstance(checked, tuple):
            await self._decide(rid, "failed", *checked, refused=True)
            return
        tries = record.get("tries", 0)  # attempts in this run
        resuming = bool(record.get("attempted")) and not tries
        if resuming:
            # The first attempt happened before a restart: Cast may have taken it. Resend (same
            # key, same account) only while Cast still remembers the key.
            not_after = record["received_at"] + SAFE_RESEND_AGE
            account = self._account(record)
            # `tries` counts this run's attempts only (the journal does not keep them).
            self.outbox.note(rid, resumed=True)
        else:
            not_after = record["received_at"] + self.config.delivery.send_deadline
            account = (
                self._account(record) if tries else self.cast.account_for(record["location_id"])
            )
        if account is None:
            reason = (
                "the Cast account of its first attempt is no longer configured; "
                "the SMS may have been sent"
            )
            await self._decide(rid, "failed", "OUTCOME_UNKNOWN", reason, refused=True)
            return
        if time.time() > not_after:
            await self._window_closed(rid, resuming)
            return
        if not record.get("attempted"):
            # Durable before the first request may leave, with the account it leaves through.
            await outbox.update(
                rid, attempted=True, account=account.name, sender_id=account.sender_id
            )
        try:
            answer = await self.cast.send_once(
                account, checked, sms_text(record), record["message_id"], not_after
            )
        except SendWindowClosed:
            await self._window_closed(rid, resuming)
            return
        except CastError as e:
            await self._send_failed(rid, e)
            return
        self._sends["sent"].inc()
        # No await between Cast's answer and queueing this entry (see Journal.append).
        await outbox.update(rid, stage="sent", cast_id=answer["message_id"], sent_at=time.time())
        log.debug(
            "sent %s cast_id=%s parts=%s",
            _context(record),
            answer["message_id"],
            answer.get("parts"),
        )
        self._route(rid)

    async def _window_closed(self, rid: str, resuming: bool) -> None:
        assert self.outbox is not None
        record = self.outbox.records[rid]
        if record.get("tries"):
            # Retrying an error in this run: the error is what we know of its outcome.
            self._sends["gave_up"].inc()
            self._log_gave_up(
                record,
                record["tries"],
                record.get("last_status", 0),
                record["last_code"],
                record["last_reason"],
                "the send deadline passed while it waited for its retry",
            )
            await self._decide(rid, "failed", record["last_code"], record["last_reason"])
        elif resuming:
            # Cast may have taken the earlier attempt and no longer remembers its idempotency
            # key: a retry could send a second SMS. Say so rather than guess.
            reason = "castghld was down too long to retry safely; the SMS may have been sent"
            await self._decide(rid, "failed", "OUTCOME_UNKNOWN", reason, refused=True)
        else:
            # Not sent before the deadline (a backlog, or castghld was down): too late to text.
            reason = "not sent: castghld could not reach Cast within the send deadline"
            await self._decide(rid, "failed", "EXPIRED", reason, refused=True)

    async def _send_failed(self, rid: str, error: CastError) -> None:
        assert self.outbox is not None
        record = self.outbox.records[rid]
        context = _context(record)
        tries = record.get("tries", 0) + 1
        provider_errors = record.get("provider_errors", 0) + (error.code == "PROVIDER_ERROR")
        reason = error.message
        if error.code == "NO_ANSWER":
            reason = "Cast did not answer before the send deadline; the SMS may have been sent"
        if not error.retryable:
            self._sends["failed"].inc()
            log.error(
                "Cast refused %s: %d %s %s",
                context,
                error.status,
                error.code,
                reason,
                extra=_send_fields(record, "refused", error.status, error.code, reason, tries),
            )
            await self._decide(rid, "failed", error.code, reason)
            return
        if not worth_retrying(error, provider_errors):
            self._sends["gave_up"].inc()
            why = f"{PROVIDER_ERROR_RETRIES} retries of PROVIDER_ERROR used up"
            self._log_gave_up(record, tries, error.status, error.code, reason, why)
            await self._decide(rid, "failed", error.code, reason)
            return
        delay = retry_delay(tries - 1, error.retry_after, *SEND_RETRY)
        if time.time() + delay > record["received_at"] + self.config.delivery.send_deadline:
            self._sends["gave_up"].inc()
            why = "the next retry would fall after the send deadline"
            self._log_gave_up(record, tries, error.status, error.code, reason, why)
            await self._decide(rid, "failed", error.code, reason)
            return
        self._sends["retry"].inc()
        log.warning(
            "Cast %d %s %s attempt=%d: %s; retrying in %.1fs",
            error.status,
            error.code,
            context,
            tries,
            error.message,  # what Cast said, or why it did not answer (the gave-up line cannot)
            delay,
        )
        self.outbox.note(
            rid,
            tries=tries,
            provider_errors=provider_errors,
            last_status=error.status,
            last_code=error.code,
            last_reason=reason,
        )
        self._later(delay, rid, _SEND)

    def _log_gave_up(
        self, record: Record, tries: int, status: int, code: str, reason: str, why: str
    ) -> None:
        """The error line of a send retried until it could not be retried any more: not a
        refusal by Cast, so it says how long we tried and what Cast last answered. After a
        restart it counts this run's attempts and says so."""
        attempts = f"{tries} attempt{'' if tries == 1 else 's'}"
        if record.get("resumed"):
            attempts += " since castghld restarted"
        log.error(
            "gave up on %s after %s over %.1fs: last error %d %s %s (%s)",
            _context(record),
            attempts,
            time.time() - record["received_at"],
            status,
            code,
            reason,
            why,
            extra=_send_fields(record, "gave_up", status, code, reason, tries),
        )

    async def _decide(
        self, rid: str, status: str, code: str = "", reason: str = "", refused: bool = False
    ) -> None:
        """The final status is known: queue its report. Journaled once the message is
        `attempted` (a crash must not turn a decided failure into a late resend); a refusal
        before any attempt is decided again the same way after a crash."""
        assert self.outbox is not None
        fields = {"stage": "report", "status": status, "error_code": code, "error_reason": reason}
        if refused:
            self._sends["rejected"].inc()
            log.warning("not sending %s: %s %s", _context(self.outbox.records[rid]), code, reason)
        if self.outbox.records[rid].get("attempted"):
            await self.outbox.update(rid, **fields)
        else:
            self.outbox.note(rid, **fields)
        self._route(rid)

    # -- delivery status -----------------------------------------------------------------------

    def _schedule_poll(self, rid: str, record: Record) -> None:
        """The next `status_polls` point; points already overdue while a later one is due too
        (after a restart, or after a slow poll) are skipped: one poll at the latest due point."""
        polls = self.config.delivery.status_polls
        index = record.get("polls_done", 0)
        if index >= len(polls):
            log.warning(
                "no delivery report for %s cast_id=%s after %d polls; GHL keeps showing pending",
                _context(record),
                record["cast_id"],
                len(polls),
            )
            self._spawn(self._finish(rid, "pending", "no delivery report"))
            return
        now = time.time()
        while index + 1 < len(polls) and record["sent_at"] + polls[index + 1] <= now:
            index += 1
        if index != record.get("polls_done", 0):
            self.outbox.note(rid, polls_done=index)
        self._later(record["sent_at"] + polls[index] - now, rid, _POLL)

    async def _poll_step(self, rid: str) -> None:
        """One status lookup; only an answered poll uses up a point of the schedule."""
        assert self.outbox is not None
        record = self.outbox.records[rid]
        account = self._account(record)
        if account is None:
            self._spawn(self._finish(rid, "pending", "its Cast account is no longer configured"))
            return
        pause = self.cast.polls_paused(account)
        if pause > 0:  # Cast answered this account's polls 429: wait without a worker
            self._later(pause, rid, _POLL)
            return
        try:
            answer = await self.cast.status(account, record["cast_id"])
        except CastError as e:
            log.warning("delivery status of %s: Cast %d %s", _context(record), e.status, e.code)
            give_up = record["sent_at"] + self.config.delivery.status_polls[-1] + POLL_OUTAGE_LIMIT
            if e.retryable and time.time() < give_up:
                failures = record.get("poll_failures", 0)
                self.outbox.note(rid, poll_failures=failures + 1)
                self._later(retry_delay(failures, e.retry_after, *POLL_RETRY), rid, _POLL)
                return
            answer = {}
        status = FINAL_STATUSES.get(str(answer.get("status")))
        if status == "failed":
            code = redact_numbers(str(answer.get("dlr_status") or answer.get("status")))
            code = code.upper()[:64]
            reason = str(answer.get("error_message") or "the carrier did not deliver it")[:300]
            log.warning(
                "Cast reported %s %s cast_id=%s: dlr_status=%s %s",
                answer["status"],
                _context(record),
                record["cast_id"],
                code,
                reason,
                extra={
                    "message_id": record["message_id"],
                    "location_id": record["location_id"],
                    "cast_id": record["cast_id"],
                    "outcome": "failed",
                    "status": answer["status"],
                    "error_code": code,
                    "reason": reason,
                },
            )
            self.outbox.note(
                rid, stage="report", status="failed", error_code=code, error_reason=reason
            )
            self._route(rid)
        elif status == "delivered":
            self.outbox.note(rid, stage="report", status="delivered")
            self._route(rid)
        else:
            self.outbox.note(rid, polls_done=record.get("polls_done", 0) + 1, poll_failures=0)
            self._schedule_poll(rid, self.outbox.records[rid])

    # -- reporting to GHL ----------------------------------------------------------------------

    async def _report_step(self, rid: str) -> None:
        """Report ``pending`` (then poll) or the final status (then finish)."""
        assert self.outbox is not None
        record = self.outbox.records[rid]
        if record["stage"] == "sent":
            status, error = "pending", None
        else:
            status, error = record["status"], _error_of(record)
        now = time.time()
        since = record.get("report_since")
        if since is None:
            since = now
            self.outbox.note(rid, report_since=since)
        end = since + self.config.delivery.report_deadline
        outcome = await self._report(record, status, error, min(end, now + REPORT_ATTEMPT))
        if outcome is None and time.time() < end:
            failures = record.get("report_failures", 0)
            self.outbox.note(rid, report_failures=failures + 1)
            self._later(retry_delay(failures, None, *REPORT_RETRY), rid, _REPORT)
            return
        if outcome is None:
            self._statuses["report_failed"].inc()
            log.error(
                "cannot report %s to GHL for %s before the report deadline",
                status,
                _context(record),
            )
        if status == "pending":
            self.outbox.note(rid, stage="polling", report_since=None, report_failures=0)
            self._route(rid)
            return
        reason = f"{error['code']}: {error['message']}" if error else ""
        await self._finish(rid, status, reason)

    async def _report(
        self, record: Record, status: str, error: dict[str, str] | None, deadline: float
    ) -> bool | None:
        """True once GHL took the status, False if it refused it for good, None if it may take
        it later (a transient failure: retry). `deadline` is wall clock."""
        body: dict[str, Any] = {"status": status}
        if status == "failed" and error:
            body["error"] = error
        path = f"/conversations/messages/{quote(record['message_id'], safe='')}/status"
        context = _context(record)
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

    async def _finish(self, rid: str, outcome: str, reason: str) -> None:
        """Forget the message (its id stays seen) and log its outcome: one line per message."""
        assert self.outbox is not None
        record = self.outbox.records.get(rid)
        if record is not None:
            log.info(
                "outbound %s %s%s%s",
                outcome,
                _context(record),
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
            await self.outbox.finish(rid)
        self._release(rid)


def _send_fields(
    record: Record, outcome: str, status: int, code: str, reason: str, attempt: int
) -> dict[str, Any]:
    """The JSON fields of a send's final-failure line."""
    return {
        "message_id": record["message_id"],
        "location_id": record["location_id"],
        "outcome": outcome,
        "status": status,
        "error_code": code,
        "reason": reason,
        "attempt": attempt,
    }


def _error_of(record: Record) -> dict[str, str] | None:
    if record.get("error_code"):
        return _error(record["error_code"], record.get("error_reason") or "")
    legacy = record.get("error")  # journaled by an older version
    return dict(legacy) if isinstance(legacy, dict) else None


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "type": "saas", "message": message}

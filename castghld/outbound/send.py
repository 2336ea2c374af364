"""The send step: one Cast attempt per message, retried on Cast's transient answers.

Guarantees:
- Exactly one SMS: every send carries ``X-Idempotency-Key`` = GHL ``messageId`` through the
  account of its first attempt (stored on the record: a config change cannot move the key to
  another account's scope), including the one after a crash between Cast's answer and the
  ``sent`` entry; Cast replays its first answer for 24 h.
- Which Cast answers are retried (`SendStep._retry_or_fail`): 429, 500, 502, 503, 504 and no
  answer at all (timeouts, connection errors: status 599), as `CastError.retryable` and
  `RETRYABLE_STATUSES` in cast.py say; ``502 PROVIDER_ERROR`` (the carrier refused it) only
  ``PROVIDER_ERROR_RETRIES`` times. A retry waits ``SEND_RETRY`` backoff with full jitter, never
  shorter than Cast's Retry-After, as a `Step.SEND` entry in the scheduler's timer heap, then
  goes to the front of its account's lane. Any other answer is Cast's final refusal: reported
  ``failed`` with Cast's error code; one that an opt-out explains (castghld.optout) with a
  reason that says so.
- Both windows are checked at the instant the request would leave, after pacing: a message never
  attempted within ``delivery.send_deadline`` is reported ``failed`` (``EXPIRED``) instead of
  sent late, and one attempted before a restart but still unresolved 23 h after it arrived
  (``SAFE_RESEND_AGE``) is reported ``failed`` (``OUTCOME_UNKNOWN``) rather than risked. No retry
  is planned past the send deadline.
- ``attempted`` (with the Cast account and sender ID) is journaled before the first request may
  leave, and is its own entry rather than implied by ``put``: a message never attempted and older
  than ``send_deadline`` after a restart must be reported ``EXPIRED``, not texted late; one
  attempted must be resent (same key) to learn its outcome. Folding the two would text the
  unattempted tail of a backlog late after a long outage. The entry shares the group commit's
  fsync with whatever else is being written.
- A decided failure is journaled once the message was attempted (a crash must not turn it into a
  late resend); a refusal before any attempt (invalid number, expired) is decided again the same
  way after a restart.
- Logs: ``Cast refused`` (error) only for Cast's final refusals, ``gave up on`` (error) when
  retries ran out or the send deadline passed, each with structured fields; ``not sending``
  (warning) for a message refused before any attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

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
from castghld.metrics import Metrics
from castghld.optout import OptOuts
from castghld.outbox import Outbox
from castghld.pacing import retry_delay
from castghld.phone import InvalidNumber, normalize_mobile
from castghld.records import OutboundRecord, Stage, log_context, sms_text
from castghld.scheduler import Step, StepScheduler

# One logger for all of outbound delivery: operators filter on it.
log = logging.getLogger("castghld.outbound")

# Cast replays the answer to an idempotency key for 24 h: a retry younger than this is safe.
SAFE_RESEND_AGE = 23 * 3600.0
# Back-off (base, cap) of a send that failed transiently.
SEND_RETRY = (1.0, 300.0)
ACCOUNT_GONE = (
    "the Cast account of its first attempt is no longer configured; the SMS may have been sent"
)


def account_of(cast: CastClient, record: OutboundRecord) -> CastAccount | None:
    """The account of the first attempt (its idempotency scope, where its Cast id lives)."""
    if "account" in record:
        return cast.stored_account(record["account"], record["sender_id"])
    return cast.account_for(record["location_id"])


class SendStep:
    """Sends a message (`send`), retries it or decides its failure (see the module docstring).
    `next_step(rid)` queues the record for the step its new stage calls for."""

    def __init__(
        self,
        config: Config,
        cast: CastClient,
        metrics: Metrics,
        scheduler: StepScheduler,
        next_step: Callable[[str], None],
    ):
        self.config = config
        self.cast = cast
        self.scheduler = scheduler
        self.outbox: Outbox | None = None
        self._next_step = next_step
        regions = config.delivery.allowed_regions
        self.allowed_regions = None if "*" in regions else frozenset(regions)
        # Metric children looked up once, not per message.
        self._sends = {o: metrics.sends.labels(o) for o in ("sent", "retry", "failed", "gave_up")}
        self._sends["rejected"] = metrics.sends.labels("rejected")
        # Called with (record, account name, Cast's answer) once Cast accepted a send: the parts
        # it charged go to the usage ledger and the metrics (OutboundDelivery sets it).
        self.on_sent: Callable[[OutboundRecord, str, dict[str, Any]], None] = _ignore
        self.opt_outs = OptOuts(cast)

    async def send(self, rid: str) -> None:
        """One attempt of the message (`Step.SEND`); a retry goes back to the timer heap."""
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
            account = account_of(self.cast, record)
            # `tries` counts this run's attempts only (the journal does not keep them).
            self.outbox.note(rid, resumed=True)
        else:
            not_after = record["received_at"] + self.config.delivery.send_deadline
            account = (
                account_of(self.cast, record)
                if tries
                else self.cast.account_for(record["location_id"])
            )
        if account is None:
            await self._decide(rid, "failed", "OUTCOME_UNKNOWN", ACCOUNT_GONE, refused=True)
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
            await self._retry_or_fail(rid, e)
            return
        self._sends["sent"].inc()
        self.on_sent(record, account.name, answer)
        # No await between Cast's answer and queueing this entry (see Journal.append).
        await outbox.update(
            rid, stage=Stage.SENT, cast_id=answer["message_id"], sent_at=time.time()
        )
        log.debug(
            "sent %s cast_id=%s parts=%s",
            log_context(record),
            answer["message_id"],
            answer.get("parts"),
        )
        self._next_step(rid)

    def _check(self, record: OutboundRecord) -> tuple[str, str] | str:
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

    async def _retry_or_fail(self, rid: str, error: CastError) -> None:
        """Cast answered `error` (or did not answer): a 429, 500, 502, 503, 504 or no answer is
        retried after ``SEND_RETRY`` backoff in the timer heap while the send deadline allows;
        a final refusal, or retries run out, is decided ``failed`` (see the module docstring)."""
        assert self.outbox is not None
        record = self.outbox.records[rid]
        context = log_context(record)
        tries = record.get("tries", 0) + 1
        provider_errors = record.get("provider_errors", 0) + (error.code == "PROVIDER_ERROR")
        reason = error.message
        if error.code == "NO_ANSWER":
            reason = "Cast did not answer before the send deadline; the SMS may have been sent"
        if not error.retryable:
            reason = await self._explain_refusal(record, error) or reason
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
        self.scheduler.later(delay, rid, Step.SEND)

    async def _explain_refusal(self, record: OutboundRecord, error: CastError) -> str | None:
        """A reason that says more than Cast's text: the number opted out of the sender ID."""
        account = account_of(self.cast, record)
        checked = self._check(record)
        if account is None or not isinstance(checked, str):
            return None
        return await self.opt_outs.explain(account, checked, error)

    def _log_gave_up(
        self, record: OutboundRecord, tries: int, status: int, code: str, reason: str, why: str
    ) -> None:
        """The error line of a send retried until it could not be retried any more: not a
        refusal by Cast, so it says how long we tried and what Cast last answered. After a
        restart it counts this run's attempts and says so."""
        attempts = f"{tries} attempt{'' if tries == 1 else 's'}"
        if record.get("resumed"):
            attempts += " since castghld restarted"
        log.error(
            "gave up on %s after %s over %.1fs: last error %d %s %s (%s)",
            log_context(record),
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
        fields = {
            "stage": Stage.REPORT,
            "status": status,
            "error_code": code,
            "error_reason": reason,
        }
        if refused:
            self._sends["rejected"].inc()
            log.warning(
                "not sending %s: %s %s", log_context(self.outbox.records[rid]), code, reason
            )
        if self.outbox.records[rid].get("attempted"):
            await self.outbox.update(rid, **fields)
        else:
            self.outbox.note(rid, **fields)
        self._next_step(rid)


def _ignore(*_: Any) -> None:
    pass


def _send_fields(
    record: OutboundRecord, outcome: str, status: int, code: str, reason: str, attempt: int
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

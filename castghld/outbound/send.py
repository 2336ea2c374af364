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
- So is the location: a message whose location left (UNINSTALL, ``forget``, marked uninstalled)
  while it waited for its pacing slot is not sent (``SendWithdrawn``) but dropped, as
  `OutboundDelivery` drops the location's other waiting messages.
- ``attempted`` (with the Cast account and sender ID) is journaled before the first request may
  leave, and is its own entry rather than implied by ``put``: a message never attempted and older
  than ``send_deadline`` after a restart must be reported ``EXPIRED``, not texted late; one
  attempted must be resent (same key) to learn its outcome. Folding the two would text the
  unattempted tail of a backlog late after a long outage. The entry shares the group commit's
  fsync with whatever else is being written.
- A decided failure is journaled once the message was attempted (a crash must not turn it into a
  late resend); a refusal before any attempt (invalid number, expired) is decided again the same
  way after a restart.
- A refusal about the account (castghld.accounts: 401, 402, 403 with an account error code) is
  no answer about the message: nothing was sent. The account is paused and the message goes back
  to the head of its lane with the same idempotency key; it fails only when its send deadline
  passes while the account is paused (`expire`), with the account's reason. ``unsent`` is
  journaled while every attempt so far got such a definite refusal or was held back by a pause
  before its request left (cleared, durably, before the next attempt leaves). When a resumed
  account answers the same refusal again to a message refused before the resume, Cast may be
  replaying it from its idempotency cache: the message goes out under a new idempotency key
  (``idem_key``, journaled before it leaves) only when ``unsent`` says no earlier attempt can
  have been sent; otherwise it is reported failed.
- The key a message is sent with is journaled (``key_id``, a hash, never the key). Cast keeps
  idempotency keys per API key: after a reload changed the account's key, a message that may
  have been sent is retried with the key it was sent with (kept by `CastClient` while the
  process runs); one that cannot have been sent (``unsent``) goes out with the new key; one that
  may have been sent with a key this process no longer has is reported failed
  (``OUTCOME_UNKNOWN``) rather than risk a second SMS.
- Logs: ``Cast refused`` (error) only for Cast's final refusals, ``gave up on`` (error) when
  retries ran out or the send deadline passed, each with structured fields; ``not sending``
  (warning) for a message refused before any attempt.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from castghld.accounts import AccountStates, is_account_refusal
from castghld.cast import (
    MAX_MESSAGE_CHARS,
    PROVIDER_ERROR_RETRIES,
    AccountPaused,
    CastAccount,
    CastClient,
    CastError,
    SendWindowClosed,
    SendWithdrawn,
    answer_summary,
    worth_retrying,
)
from castghld.config import DEFAULT_ACCOUNT_NAME, Config
from castghld.metrics import Metrics
from castghld.optout import OptOuts
from castghld.outage import CastOutages
from castghld.outbound.refusals import AccountRefusals
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
KEY_GONE = (
    "it was sent with a Cast API key that castghld no longer has, and Cast keeps idempotency "
    "keys per API key; the SMS may have been sent"
)


def account_of(cast: CastClient, record: OutboundRecord) -> CastAccount | None:
    """The account of the first attempt (its idempotency scope, where its Cast id lives), with
    the account's current key."""
    if "account" in record:
        return cast.stored_account(record["account"], record["sender_id"], sent_key_id(record))
    return cast.account_for(record["location_id"])


def sent_key_id(record: OutboundRecord) -> str | None:
    """The `CastAccount.key_id` of the key the message was last attempted with, if known (a
    record journaled before ``key_id`` names its account by that key's default name)."""
    if record.get("key_id"):
        return record["key_id"]
    account = record.get("account", "")
    return account if DEFAULT_ACCOUNT_NAME.fullmatch(account) else None


def resend_account(cast: CastClient, record: OutboundRecord) -> tuple[CastAccount | None, str]:
    """The account and key to attempt an attempted message with again, or (None, why not)."""
    account = account_of(cast, record)
    if account is None:
        return None, ACCOUNT_GONE
    key_id = sent_key_id(record)
    if key_id is None or key_id == account.key_id or record.get("unsent"):
        return account, ""
    old_key = cast.retired_key(key_id)
    if old_key is None:
        return None, KEY_GONE
    return dataclasses.replace(account, api_key=old_key), ""


def attempt_fields(record: OutboundRecord, account: CastAccount) -> tuple[str, dict[str, Any]]:
    """The idempotency key of the next attempt through `account`, and the fields to journal
    before it may leave: the first attempt's ``attempted`` with the account, sender ID and key
    id; for a later one, ``unsent`` cleared (this attempt may send), and a new key id or
    idempotency key, which only a message that cannot have been sent gets."""
    current = record.get("idem_key") or record["message_id"]
    idempotency_key = fresh_idempotency_key(record) if record.get("fresh_key") else current
    if not record.get("attempted"):
        first = {
            "attempted": True,
            "account": account.name,
            "sender_id": account.sender_id,
            "key_id": account.key_id,
        }
        return idempotency_key, first
    fields: dict[str, Any] = {"unsent": False} if record.get("unsent") else {}
    if record.get("key_id") != account.key_id:
        fields["key_id"] = account.key_id
    if idempotency_key != current:
        fields["idem_key"] = idempotency_key
    return idempotency_key, fields


def fresh_idempotency_key(record: OutboundRecord) -> str:
    """A new idempotency key for a message whose old one Cast answers with a cached refusal."""
    current = record.get("idem_key") or record["message_id"]
    base, _, n = current.rpartition("~r")
    if base and n.isdigit():
        return f"{base}~r{int(n) + 1}"
    return f"{record['message_id'][:240]}~r1"


class SendStep(AccountRefusals):
    """Sends a message (`send`), retries it or decides its failure (see the module docstring).
    `next_step(rid)` queues the record for the step its new stage calls for."""

    def __init__(
        self,
        config: Config,
        cast: CastClient,
        metrics: Metrics,
        scheduler: StepScheduler,
        next_step: Callable[[str], None],
        may_leave: Callable[[str], bool],
        withdrawn: Callable[[str], Awaitable[None]],
    ):
        self.config = config
        self.cast = cast
        self.outages = CastOutages(metrics)
        self.scheduler = scheduler
        self.outbox: Outbox | None = None
        self.accounts: AccountStates | None = None  # set by the owner
        self._next_step = next_step
        # Whether a location is still installed, asked at the instant a request would leave;
        # `withdrawn(rid)` ends a message whose location left.
        self.may_leave = may_leave
        self.withdrawn = withdrawn
        self._regions: tuple[tuple[str, ...], frozenset[str] | None] = ((), None)
        # Metric children looked up once, not per message.
        self._sends = {o: metrics.sends.labels(o) for o in ("sent", "retry", "failed", "gave_up")}
        self._sends["rejected"] = metrics.sends.labels("rejected")
        # Called with (record, account name, Cast's answer) once Cast accepted a send: the parts
        # it charged go to the usage ledger and the metrics (OutboundDelivery sets it).
        self.on_sent: Callable[[OutboundRecord, str, dict[str, Any]], None] = _ignore
        self.opt_outs = OptOuts(cast)

    @property
    def allowed_regions(self) -> frozenset[str] | None:
        """`delivery.allowed_regions` of the config in force (a reload changes it); None: any."""
        regions = self.config.delivery.allowed_regions
        if regions is not self._regions[0]:
            self._regions = (regions, None if "*" in regions else frozenset(regions))
        return self._regions[1]

    async def send(self, rid: str) -> None:
        """One attempt of the message (`Step.SEND`); a retry goes back to the timer heap.
        Kept whole: it reads as the attempt's order, each early exit one decision on the way."""
        assert self.outbox is not None
        outbox = self.outbox
        record = outbox.records[rid]
        checked = self._check(record)
        if isinstance(checked, tuple):
            await self._decide(rid, "failed", *checked, refused=True)
            return
        resuming = self.resuming(record)
        if resuming:  # attempted before a restart, maybe taken: resend while Cast has the key
            self.outbox.note(rid, resumed=True)  # `tries` counts this run's attempts only
        not_after = self.not_after(record)
        account, why = (
            resend_account(self.cast, record)
            if record.get("attempted")
            else (self.cast.account_for(record["location_id"]), "")
        )
        if account is None:
            await self._decide(rid, "failed", "OUTCOME_UNKNOWN", why, refused=True)
            return
        if time.time() > not_after:
            await self._window_closed(rid, resuming)
            return
        if account.name in self.cast.paused:  # paused while it waited: back to its lane's head
            self.scheduler.queue_send(rid, account.name, front=True)
            return
        clean = not record.get("attempted") or bool(record.get("unsent"))
        idempotency_key = await self._before_attempt(rid, account)
        try:
            leave = functools.partial(self.may_leave, record["location_id"])
            answer = await self.cast.send_once(
                account, checked, sms_text(record), idempotency_key, not_after, leave
            )
        except SendWindowClosed:
            return await self._window_closed(rid, resuming)
        except SendWithdrawn:
            return await self.withdrawn(rid)
        except AccountPaused:  # held back: this attempt sent nothing, nor did those before it
            if clean:
                await outbox.update(rid, unsent=True)
            self.scheduler.queue_send(rid, account.name, front=True)
            return
        except CastError as e:
            if is_account_refusal(e):
                await self._account_refused(rid, account, e, clean)
            else:
                await self._retry_or_fail(rid, e)
            return
        self._sends["sent"].inc()
        self.outages.observe(account.name, None)
        self.on_sent(record, account.name, answer)
        if self.accounts is not None:
            self.accounts.record_send(account.name)
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

    def resuming(self, record: OutboundRecord) -> bool:
        """Whether the message was attempted before this process started and may have been
        sent (an attempt answered by a definite refusal, ``unsent``, sent nothing)."""
        attempted = bool(record.get("attempted"))
        return attempted and not record.get("tries") and not record.get("unsent")

    def not_after(self, record: OutboundRecord) -> float:
        """The wall-clock time after which no attempt of the message may leave."""
        if self.resuming(record):
            return record["received_at"] + SAFE_RESEND_AGE
        return record["received_at"] + self.config.delivery.send_deadline

    async def _before_attempt(self, rid: str, account: CastAccount) -> str:
        """Journal what this attempt changes (`attempt_fields`) before it may leave; its
        idempotency key."""
        assert self.outbox is not None
        record = self.outbox.records[rid]
        idempotency_key, fields = attempt_fields(record, account)
        if record.get("fresh_key"):
            self.outbox.note(rid, fresh_key=False)
        if fields:
            await self.outbox.update(rid, **fields)
        return idempotency_key

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
            log_gave_up(
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
        level, outage_note = self.outages.observe(record["account"], error)
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
            log_gave_up(record, tries, error.status, error.code, reason, why)
            await self._decide(rid, "failed", error.code, reason)
            return
        delay = retry_delay(tries - 1, error.retry_after, *SEND_RETRY)
        if time.time() + delay > record["received_at"] + self.config.delivery.send_deadline:
            self._sends["gave_up"].inc()
            why = "the next retry would fall after the send deadline"
            log_gave_up(record, tries, error.status, error.code, reason, why)
            await self._decide(rid, "failed", error.code, reason)
            return
        self._sends["retry"].inc()
        log.log(
            level,  # while Cast does not answer an account: one warning, then debug (outage.py)
            "Cast %s %s attempt=%d: %s; retrying in %.1fs%s",
            error.summary,
            context,
            tries,
            error.message,  # what Cast said, or why it did not answer (the gave-up line cannot)
            delay,
            outage_note,
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


def log_gave_up(
    record: OutboundRecord, tries: int, status: int, code: str, reason: str, why: str
) -> None:
    """The error line of a send retried until it could not be retried any more: not a
    refusal by Cast, so it says how long we tried and what Cast last answered. After a
    restart it counts this run's attempts and says so."""
    attempts = f"{tries} attempt{'' if tries == 1 else 's'}"
    if record.get("resumed"):
        attempts += " since castghld restarted"
    log.error(
        "gave up on %s after %s over %.1fs: last error %s %s (%s)",
        log_context(record),
        attempts,
        time.time() - record["received_at"],
        answer_summary(status, code),
        reason,
        why,
        extra=_send_fields(record, "gave_up", status, code, reason, tries),
    )

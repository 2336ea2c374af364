"""The receipt step: Cast's delivery status of a sent message, polled on a schedule.

Guarantees:
- Polls follow ``delivery.status_polls`` (seconds after the send); points already overdue while a
  later one is due too (after a restart, a slow poll) are skipped: one poll at the latest point.
- Never stuck "pending" silently: only polls Cast answered use up the schedule; a status outage
  (a retryable Cast error) is retried with ``POLL_RETRY`` backoff for up to ``POLL_OUTAGE_LIMIT``
  after the last point, and a poll answered 429 pauses that account's polls without holding a
  worker. A message still undecided after the last point is logged (warning) and finished as
  ``pending``: GHL keeps showing it so.
- A poll answered with a refusal about the account (castghld.accounts: a revoked key, no IP
  whitelist...) is waited out like an outage: it uses up no point of the schedule.
- After a reload changed the account's key, the lookup uses the new key (Cast answers for any
  key of the account, SPEC §5); if Cast answers 404 for it, the key the message was sent with,
  which `CastClient` keeps while the process runs, is asked (a Cast that scopes messages per key).
- Cast's ``delivered`` becomes ``delivered``; ``undelivered`` and ``failed`` become ``failed``,
  logged ``Cast reported undelivered|failed`` (warning) with Cast's ``dlr_status`` and text,
  numbers redacted. The decided status is kept in memory only: a restart polls again, and Cast
  answers the same.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from castghld.accounts import is_account_refusal
from castghld.cast import CastAccount, CastClient, CastError
from castghld.config import Config
from castghld.log import redact_numbers
from castghld.outbound.report import Finish
from castghld.outbound.send import account_of, sent_key_id
from castghld.outbox import Outbox
from castghld.pacing import retry_delay
from castghld.records import OutboundRecord, Stage, log_context
from castghld.scheduler import Step, StepScheduler

log = logging.getLogger("castghld.outbound")

FINAL_STATUSES = {"delivered": "delivered", "undelivered": "failed", "failed": "failed"}
# How long after the last scheduled poll a Cast status outage is waited out.
POLL_OUTAGE_LIMIT = 24 * 3600.0
# Back-off (base, cap) of a status poll that failed transiently.
POLL_RETRY = (0.5, 300.0)


class ReceiptStep:
    """Schedules (`schedule`) and runs (`poll`) the status polls of sent messages (see the module
    docstring). `next_step(rid)` queues a decided record for its report; `finish(rid, outcome,
    reason)` ends a message that stays ``pending``."""

    def __init__(
        self,
        config: Config,
        cast: CastClient,
        scheduler: StepScheduler,
        next_step: Callable[[str], None],
        finish: Finish,
    ):
        self.config = config
        self.cast = cast
        self.scheduler = scheduler
        self.outbox: Outbox | None = None
        self._next_step = next_step
        self._finish = finish

    def schedule(self, rid: str, record: OutboundRecord) -> None:
        """The next `status_polls` point; points already overdue while a later one is due too
        (after a restart, or after a slow poll) are skipped: one poll at the latest due point."""
        assert self.outbox is not None
        polls = self.config.delivery.status_polls
        index = record.get("polls_done", 0)
        if index >= len(polls):
            log.warning(
                "no delivery report for %s cast_id=%s after %d polls; GHL keeps showing pending",
                log_context(record),
                record["cast_id"],
                len(polls),
            )
            self.scheduler.spawn(self._finish(rid, "pending", "no delivery report"))
            return
        now = time.time()
        while index + 1 < len(polls) and record["sent_at"] + polls[index + 1] <= now:
            index += 1
        if index != record.get("polls_done", 0):
            self.outbox.note(rid, polls_done=index)
        self.scheduler.later(record["sent_at"] + polls[index] - now, rid, Step.POLL)

    async def poll(self, rid: str) -> None:
        """One status lookup (`Step.POLL`); only an answered poll uses up a point of the
        schedule."""
        assert self.outbox is not None
        record = self.outbox.records[rid]
        account = account_of(self.cast, record)
        if account is None:
            self.scheduler.spawn(
                self._finish(rid, "pending", "its Cast account is no longer configured")
            )
            return
        pause = self.cast.polls_paused(account)
        if pause > 0:  # Cast answered this account's polls 429: wait without a worker
            self.scheduler.later(pause, rid, Step.POLL)
            return
        try:
            answer = await self._lookup(account, record)
        except CastError as e:
            log.warning("delivery status of %s: Cast %d %s", log_context(record), e.status, e.code)
            give_up = record["sent_at"] + self.config.delivery.status_polls[-1] + POLL_OUTAGE_LIMIT
            waited_out = e.retryable or is_account_refusal(e)
            if waited_out and time.time() < give_up:
                failures = record.get("poll_failures", 0)
                self.outbox.note(rid, poll_failures=failures + 1)
                self.scheduler.later(
                    retry_delay(failures, e.retry_after, *POLL_RETRY), rid, Step.POLL
                )
                return
            answer = {}
        self._decided(rid, record, answer)

    async def _lookup(self, account: CastAccount, record: OutboundRecord) -> dict:
        """The status lookup with the account's key; on 404, with the key that sent it."""
        try:
            return await self.cast.status(account, record["cast_id"])
        except CastError as e:
            key_id = sent_key_id(record)
            old_key = self.cast.retired_key(key_id) if key_id else None
            if e.code != "NOT_FOUND" or old_key is None or key_id == account.key_id:
                raise
        return await self.cast.status(
            dataclasses.replace(account, api_key=old_key), record["cast_id"]
        )

    def _decided(self, rid: str, record: OutboundRecord, answer: dict) -> None:
        """What Cast's answer decides: a final status to report, or the next poll."""
        assert self.outbox is not None
        status = FINAL_STATUSES.get(str(answer.get("status")))
        if status == "failed":
            code = redact_numbers(str(answer.get("dlr_status") or answer.get("status")))
            code = code.upper()[:64]
            reason = str(answer.get("error_message") or "the carrier did not deliver it")[:300]
            log.warning(
                "Cast reported %s %s cast_id=%s: dlr_status=%s %s",
                answer["status"],
                log_context(record),
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
                rid, stage=Stage.REPORT, status="failed", error_code=code, error_reason=reason
            )
            self._next_step(rid)
        elif status == "delivered":
            self.outbox.note(rid, stage=Stage.REPORT, status="delivered")
            self._next_step(rid)
        else:
            self.outbox.note(rid, polls_done=record.get("polls_done", 0) + 1, poll_failures=0)
            self.schedule(rid, self.outbox.records[rid])

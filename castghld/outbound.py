"""Outbound SMS: a GHL ``ProviderOutboundMessage`` from the outbox to Cast, and its status to GHL.

Each record moves through stages, and every stage change is in the outbox journal before the
next step starts, so a restart resumes where the process stopped:

``new`` -> (validate, send through Cast) -> ``sent`` -> (report ``pending``) -> ``polling`` ->
(poll Cast's delivery status) -> ``report`` -> (report the final status) -> finished.
A message we cannot send goes ``new`` -> ``report`` with status ``failed`` and a reason.

Exactly one SMS: the Cast send carries ``X-Idempotency-Key`` = GHL ``messageId`` on every attempt,
including the one after a crash between Cast's answer and the ``sent`` record; Cast replays its
first answer, so the worst a crash costs is a repeated request, never a repeated SMS. That
holds for 24 h (Cast's replay window): ``attempted`` is recorded before the first attempt, a
message never attempted within ``delivery.send_deadline`` (at most 12 h) is reported ``failed``
(``EXPIRED``) instead of sent late, and one attempted but still unresolved 23 h after it arrived
(the daemon was down that long) is reported ``failed`` (``OUTCOME_UNKNOWN``) rather than risked.
Never stuck "pending" silently: a message still undecided after the last poll is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from castghld.cast import (
    MAX_MESSAGE_CHARS,
    CastAccount,
    CastClient,
    CastError,
    SendWindowClosed,
)
from castghld.config import Config
from castghld.ghl import GHLClient, GHLError, TokenUnavailable
from castghld.metrics import Metrics
from castghld.outbox import Outbox, Record
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
# Back-off (base, cap) of a status poll that failed (429, 5xx, no answer).
POLL_RETRY = (0.5, 300.0)


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
        "attachments": list(payload.get("attachments") or []),
        "received_at": time.time(),
    }


def sms_text(record: Record) -> str:
    """The message with attachment URLs appended, one per line (Cast has no MMS)."""
    parts = [record["message"]] if record["message"] else []
    parts += record["attachments"]
    return "\n".join(parts)


def _is_no_provider(error: GHLError) -> bool:
    return error.status == 403 and NO_PROVIDER in error.message.lower()


class OutboundDelivery:
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
        self.metrics = metrics
        regions = config.delivery.allowed_regions
        self.allowed_regions = None if "*" in regions else frozenset(regions)

    def _deadline(self, since: float, budget: float) -> float:
        """A wall-clock budget that survives restarts, as a `time.monotonic()` deadline."""
        return time.monotonic() + (since + budget - time.time())

    async def __call__(self, outbox: Outbox, rid: str) -> None:
        record = outbox.records[rid]
        context = f"message={record['message_id']} location={record['location_id']}"
        if record["stage"] == "new":
            await self._send(outbox, rid, record, context)
        if record["stage"] == "sent":
            await self._report(record, "pending", None, context)
            await outbox.update(rid, stage="polling")
        if record["stage"] == "polling":
            await self._poll(outbox, rid, record, context)
        if record["stage"] == "report":
            await self._report(record, record["status"], record.get("error"), context)
        await outbox.finish(rid)

    # -- sending -------------------------------------------------------------------------------

    def _check(self, record: Record) -> tuple[str, str] | str:
        """The E.164 number to send to, or (error code, reason) why we cannot send."""
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

    async def _reject(self, outbox: Outbox, rid: str, code: str, reason: str, context: str) -> None:
        log.warning("not sending %s: %s %s", context, code, reason)
        self.metrics.sends.labels("rejected").inc()
        await outbox.update(rid, stage="report", status="failed", error=_error(code, reason))

    async def _send(self, outbox: Outbox, rid: str, record: Record, context: str) -> None:
        checked = self._check(record)
        if isinstance(checked, tuple):
            await self._reject(outbox, rid, *checked, context)
            return
        resuming = bool(record.get("attempted"))
        if resuming:
            # A first attempt happened before a restart: Cast may have taken it. Resend (same key,
            # same account) only while Cast still remembers the key.
            not_after = record["received_at"] + SAFE_RESEND_AGE
            account = self._account(record)
        else:
            not_after = record["received_at"] + self.config.delivery.send_deadline
            account = self.cast.account_for(record["location_id"])
        if time.time() > not_after:
            await self._too_late(outbox, rid, resuming, context)
            return
        if account is None:
            reason = (
                "the Cast account of its first attempt is no longer configured; "
                "the SMS may have been sent"
            )
            await self._reject(outbox, rid, "OUTCOME_UNKNOWN", reason, context)
            return
        if not resuming:
            # Durable before the first request may leave, with the account it leaves through.
            await outbox.update(
                rid, attempted=True, account=account.name, sender_id=account.sender_id
            )
        deadline = self._deadline(record["received_at"], self.config.delivery.send_deadline)
        try:
            answer = await self.cast.send(
                account,
                checked,
                sms_text(record),
                record["message_id"],
                deadline=deadline,
                not_after=not_after,
                context=context,
            )
        except SendWindowClosed:
            await self._too_late(outbox, rid, resuming, context)
            return
        except CastError as e:
            reason = e.message
            if e.code == "NO_ANSWER":
                reason = "Cast did not answer before the send deadline; the SMS may have been sent"
            log.error("Cast refused %s: %d %s %s", context, e.status, e.code, reason)
            await outbox.update(rid, stage="report", status="failed", error=_error(e.code, reason))
            return
        # No await between Cast's answer and queueing this entry (see Journal.append).
        await outbox.update(
            rid,
            stage="sent",
            cast_id=answer["message_id"],
            sent_at=time.time(),
            polls_done=0,
        )
        log.info("sent %s cast_id=%s parts=%s", context, answer["message_id"], answer.get("parts"))

    async def _too_late(self, outbox: Outbox, rid: str, resuming: bool, context: str) -> None:
        if resuming:
            # Cast may have taken the earlier attempt and no longer remembers its idempotency
            # key: a retry could send a second SMS. Say so rather than guess.
            reason = "castghld was down too long to retry safely; the SMS may have been sent"
            await self._reject(outbox, rid, "OUTCOME_UNKNOWN", reason, context)
        else:
            # Not sent before the deadline (a backlog, or castghld was down): too late to text.
            reason = "not sent: castghld could not reach Cast within the send deadline"
            await self._reject(outbox, rid, "EXPIRED", reason, context)

    # -- delivery status -----------------------------------------------------------------------

    def _account(self, record: Record) -> CastAccount | None:
        """The account the message was sent through (its Cast message id lives there)."""
        if "account" in record:
            return self.cast.stored_account(record["account"], record["sender_id"])
        return self.cast.account_for(record["location_id"])

    async def _poll(self, outbox: Outbox, rid: str, record: Record, context: str) -> None:
        """Poll at the `status_polls` points; only polls Cast answered use one up.

        A transient failure (429, 5xx, no answer) is retried with backoff at the same point, for
        up to `POLL_OUTAGE_LIMIT` after the last one: a Cast status outage delays the report,
        it does not leave the message pending in GHL.
        """
        account = self._account(record)
        polls = self.config.delivery.status_polls
        index = record.get("polls_done", 0)
        failures = 0
        while account is not None and index < len(polls):
            # Polls already overdue while a later one is due too (after a restart, or after a
            # slow poll) are skipped: one poll at the latest due point, not several back to back.
            now = time.time()
            while index + 1 < len(polls) and record["sent_at"] + polls[index + 1] <= now:
                index += 1
            wait = record["sent_at"] + polls[index] - now
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                answer = await self.cast.status(account, record["cast_id"])
            except CastError as e:
                log.warning("delivery status of %s: Cast %d %s", context, e.status, e.code)
                give_up = record["sent_at"] + polls[-1] + POLL_OUTAGE_LIMIT
                if e.retryable and time.time() < give_up:
                    await asyncio.sleep(retry_delay(failures, e.retry_after, *POLL_RETRY))
                    failures += 1
                    continue
                answer = {}
            failures = 0
            status = FINAL_STATUSES.get(str(answer.get("status")))
            if status == "delivered":
                await outbox.update(rid, stage="report", status="delivered", polls_done=index + 1)
                return
            if status == "failed":
                code = str(answer.get("dlr_status") or answer.get("status")).upper()[:64]
                reason = str(answer.get("error_message") or "the carrier did not deliver it")
                error = _error(code, reason[:300])
                await outbox.update(
                    rid, stage="report", status="failed", error=error, polls_done=index + 1
                )
                return
            await outbox.update(rid, polls_done=index + 1)
            index += 1
        log.warning(
            "no delivery report for %s cast_id=%s after %d polls; GHL keeps showing pending",
            context,
            record["cast_id"],
            len(polls),
        )
        await outbox.update(rid, stage="undecided")

    # -- reporting to GHL ----------------------------------------------------------------------

    async def _report(
        self, record: Record, status: str, error: dict[str, str] | None, context: str
    ) -> None:
        body: dict[str, Any] = {"status": status}
        if status == "failed" and error:
            body["error"] = error
        location_id = record["location_id"]
        path = f"/conversations/messages/{record['message_id']}/status"
        deadline = self._deadline(time.time(), self.config.delivery.report_deadline)
        try:
            await self.ghl.call(
                self.installations,
                location_id,
                "PUT",
                path,
                json_body=body,
                deadline=deadline,
                retry_if=_is_no_provider,
                context=context,
            )
        except (GHLError, TokenUnavailable) as e:
            self.metrics.statuses.labels("report_failed").inc()
            log.error("cannot report %s to GHL for %s: %s", status, context, e)
            return
        self.metrics.statuses.labels(status).inc()
        log.info("reported %s to GHL for %s", status, context)


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "type": "saas", "message": message}

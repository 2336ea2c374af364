"""The send step's answer to a refusal about the Cast account (castghld.accounts: 401, 402, 403
with an account error code): nothing was sent, so the account is paused and the message waits
at the head of its lane; after a resume, a refusal Cast may be replaying from its idempotency
cache is sent again under a new idempotency key only if no attempt can have been sent; a message
whose send deadline passes while its account is paused fails with the account's reason. The
guarantees are stated with the rest of the send step's, in send.py.
"""

from __future__ import annotations

import logging
from typing import Any

from castghld.accounts import AccountStates, Pause
from castghld.cast import CastAccount, CastClient, CastError
from castghld.outbox import Outbox
from castghld.records import log_context
from castghld.scheduler import StepScheduler

# One logger for all of outbound delivery: operators filter on it.
log = logging.getLogger("castghld.outbound")


class AccountRefusals:
    """The account refusals of `SendStep`, its base: these methods use the step's outbox,
    account states, Cast client, lanes, counters and `_decide`."""

    outbox: Outbox | None
    accounts: AccountStates | None
    cast: CastClient
    scheduler: StepScheduler
    _sends: dict[str, Any]

    async def _account_refused(
        self, rid: str, account: CastAccount, error: CastError, clean: bool
    ) -> None:
        """Cast refused the attempt for a reason about the account: nothing was sent. Pause the
        account and put the message back at the head of its lane, or, when this is the refusal
        the message met before the account was resumed (Cast may replay it from its idempotency
        cache), send it under a new idempotency key if no attempt can have been sent."""
        assert self.outbox is not None and self.accounts is not None
        record = self.outbox.records[rid]
        current = self.cast.stored_account(account.name, account.sender_id)
        if current is not None and current.api_key != account.api_key:
            await self._replaced_key_refused(rid, account, error, clean)
            return
        epoch = self.accounts.epoch(account.name)
        replayed = record.get("refused_code") == error.code and record["refused_epoch"] < epoch
        pause = None if replayed else self.accounts.pause(account, error)
        reason = pause.reason if pause is not None else record.get("last_reason", error.message)
        self.outbox.note(
            rid,
            tries=record.get("tries", 0) + 1,
            refused_code=error.code,
            refused_epoch=epoch,
            last_status=error.status,
            last_code=error.code,
            last_reason=reason,
        )
        if clean:
            await self.outbox.update(rid, unsent=True)
        if replayed and not clean:
            self._sends["failed"].inc()
            why = (
                f"Cast still answers {error.code} to it after the account was fixed, and an "
                "earlier attempt had no clear answer: not resent under a new idempotency key"
            )
            await self._decide(rid, "failed", error.code, why)
            return
        if replayed:
            log.warning(
                "Cast answered %s %s again after the account was fixed (a refusal replayed from "
                "its idempotency cache?); no attempt was sent, so it goes out under a new "
                "idempotency key",
                error.code,
                log_context(record),
            )
            self.outbox.note(rid, fresh_key=True)
        self._sends["retry"].inc()
        self.scheduler.queue_send(rid, account.name, front=True)

    async def _replaced_key_refused(
        self, rid: str, account: CastAccount, error: CastError, clean: bool
    ) -> None:
        """Cast refused, for a reason about the account, a key that a reload has replaced.
        `clean` (no attempt can have been sent): the account's current key sends it, and a later
        refusal of the same code counts as replayed from Cast's cache (a new idempotency key).
        Otherwise only that key could tell whether it was sent: reported failed."""
        assert self.outbox is not None
        if clean:
            self.outbox.note(rid, refused_code=error.code, refused_epoch=-1)
            await self.outbox.update(rid, unsent=True)
            self._sends["retry"].inc()
            self.scheduler.queue_send(rid, account.name, front=True)
            return
        self._sends["failed"].inc()
        why = (
            f"Cast refuses ({error.code}) the replaced API key it may have been sent with, "
            "and keeps idempotency keys per API key; the SMS may have been sent"
        )
        await self._decide(rid, "failed", "OUTCOME_UNKNOWN", why)

    async def expire(self, rid: str, pause: Pause) -> None:
        """The message's send deadline passed while its account was paused: report it failed
        with the account's reason (the owner logs one line for all that expire together)."""
        self._sends["gave_up"].inc()
        await self._decide(rid, "failed", pause.code, pause.reason + " before its send deadline")

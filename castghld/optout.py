"""Opt-outs: tell a send Cast refused because its number opted out of the sender ID.

Cast blocks sends to a number that unsubscribed from a sender ID (SPEC §5 Account,
``/api/v1/account/unsubscribed``) but documents no error code for that refusal: it arrives as a
message-level one (400 ``VALIDATION_ERROR`` / ``INVALID_REQUEST``) or a code Cast does not
document. On such a final refusal `OptOuts.explain` reads the account's opt-out list and, when it
lists the number for the send's sender ID (any sender ID when the send names none: Cast used the
account's own), gives the reason GHL is told instead of Cast's text.

Guarantees:
- One read of the list per account per `LIST_TTL` seconds, however many refusals a campaign to
  opted-out numbers meets; a read that fails leaves Cast's own reason.
- The list holds numbers: it is kept in memory only, as number keys, and no number reaches a log
  line or the reason (the reason names the sender ID).
- Account-level refusals (401, 402, 403) and retried errors are never looked up.
"""

from __future__ import annotations

import logging
import re
import time

from castghld.cast import CastAccount, CastClient, CastError
from castghld.metrics import CAST_ERROR_CODES

log = logging.getLogger("castghld.outbound")

LIST_TTL = 60.0
# The documented codes a refusal about the message itself arrives with.
MESSAGE_CODES = frozenset({"VALIDATION_ERROR", "INVALID_REQUEST"})
ANY_SENDER = ""


def number_key(number: str) -> str:
    """A PH number in any form (+639..., 639..., 09...) as its last 10 digits."""
    return re.sub(r"\D", "", number)[-10:]


def may_be_opt_out(error: CastError) -> bool:
    """A final refusal that an opt-out could explain: a documented message-level code, or a 4xx
    code Cast does not document."""
    if error.retryable or not 400 <= error.status < 500:
        return False
    return error.code in MESSAGE_CODES or error.code not in CAST_ERROR_CODES


class OptOuts:
    """The opt-out lists of the accounts whose sends were refused, read on demand."""

    def __init__(self, cast: CastClient):
        self.cast = cast
        # account name -> (monotonic time read, {(number key, sender ID)})
        self._lists: dict[str, tuple[float, frozenset[tuple[str, str]]]] = {}

    async def explain(self, account: CastAccount, to: str, error: CastError) -> str | None:
        """The reason to report when `to` opted out of `account`'s sender ID, else None."""
        if not may_be_opt_out(error):
            return None
        listed = await self._list(account)
        key = number_key(to)
        if listed is None:
            return None
        sender_id = account.sender_id
        if (key, sender_id) in listed or (not sender_id and (key, ANY_SENDER) in listed):
            shown = repr(sender_id) if sender_id else "of the account"
            return (
                f"the recipient opted out of sender ID {shown} (Cast's unsubscribed list); "
                f"Cast refused the send with {error.code}"
            )
        return None

    async def _list(self, account: CastAccount) -> frozenset[tuple[str, str]] | None:
        cached = self._lists.get(account.name)
        if cached is not None and time.monotonic() - cached[0] < LIST_TTL:
            return cached[1]
        try:
            answer = await self.cast.account_info(account, "unsubscribed")
        except CastError as e:
            log.warning(
                "cannot read Cast account %s's opt-out list: %d %s", account.name, e.status, e.code
            )
            return None
        entries = answer.get("data")
        keys: set[tuple[str, str]] = set()
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("phone"), str):
                key = number_key(entry["phone"])
                keys.add((key, str(entry.get("sender_id") or "")))
                keys.add((key, ANY_SENDER))
        listed = frozenset(keys)
        self._lists[account.name] = (time.monotonic(), listed)
        return listed

"""Cast accounts: a refusal about the account pauses it; a probe, or a new key, resumes it.

Cast answers 401 ``INVALID_API_KEY``, 402 ``INSUFFICIENT_CREDITS``/``CREDIT_LIMIT_REACHED`` and
403 ``API_KEY_REVOKED``/``API_KEY_EXPIRED``/``USER_INACTIVE``/``IP_NOT_WHITELISTED``/
``CHANNEL_NOT_ALLOWED`` before sending anything, and answers the same to every message of the
account until a person fixes the account (SPEC §5). Those answers are facts about the account,
not about the message.

Guarantees:
- The first such answer pauses the account (`AccountStates.pause`): its name goes into
  ``CastClient.paused`` (no send leaves on it from that instant) and its send lane stops being
  served; the message goes back to the head of the lane (castghld.outbound.send). Other accounts
  are not touched: they have lanes of their own and share only the per-IP pace.
- While paused, a probe (``GET /api/v1/account/balance``, and ``/profile`` where the reason needs
  it) runs with backoff from ``PROBE_BACKOFF[0]`` up to ``PROBE_BACKOFF[1]`` seconds, paced like a
  status poll. The account resumes when the probe shows the reason gone: credits above 0
  (``INSUFFICIENT_CREDITS``), credits above the postpaid limit or higher than at the pause
  (``CREDIT_LIMIT_REACHED``), ``sms`` among the allowed channels
  (``CHANNEL_NOT_ALLOWED``), an active user (``USER_INACTIVE``), the key and IP accepted (the
  rest). A profile without ``allowed_channels`` or ``is_active`` cannot tell: it resumes the
  account and the next send tells. A reload that changes the account's key resumes it at once
  (`key_changed`): the next send tells whether the new key works.
- Between probes the owner's `expire` callback fails the waiting messages whose send deadline
  passed, with `Pause.reason` ("Cast account acct-… has no credits since 14:02 UTC ...");
  the probe loop wakes for the earliest such deadline. Nothing else fails because of a pause.
- One ``error`` line per pause and one ``info`` line per resume, each naming the account, the
  reason, the messages waiting and the fix; ``castghld_cast_account_paused{account,reason}`` is 1
  while paused, 0 after. No key ever appears in either.
- What `castghld accounts` shows of an account is kept here too: the last balance read (by a
  probe or by `read`) and the sends of the last hour, in one counter per minute (60 ints per
  account, whatever the rate).
- Every resume starts a new `epoch` of the account: the send step uses it to tell a refusal that
  Cast replays from its idempotency cache (the same refusal, to a message refused before the
  account was fixed) from a new one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from castghld.cast import CastAccount, CastClient, CastError
from castghld.metrics import Metrics
from castghld.pacing import backoff_delay

log = logging.getLogger("castghld.accounts")

# What the account has, and what fixes it, by Cast's error_code.
ACCOUNT_REFUSALS = {
    "INVALID_API_KEY": ("refuses its API key as invalid", "put a valid key in its api_key"),
    "API_KEY_REVOKED": ("has its API key revoked", "put a new key in its api_key"),
    "API_KEY_EXPIRED": ("has its API key expired", "put a new key in its api_key"),
    "INSUFFICIENT_CREDITS": ("has no credits", "top up the Cast account's credits"),
    "CREDIT_LIMIT_REACHED": (
        "reached its postpaid credit limit",
        "pay the Cast account's balance or have Cast raise its credit limit",
    ),
    "USER_INACTIVE": ("is inactive", "have Cast reactivate the account"),
    "IP_NOT_WHITELISTED": (
        "does not accept this server's IP address",
        "whitelist this server's IP address in Cast's dashboard",
    ),
    "CHANNEL_NOT_ALLOWED": ("may not send SMS", "have Cast allow the sms channel"),
}
KEY_REFUSALS = frozenset({"INVALID_API_KEY", "API_KEY_REVOKED", "API_KEY_EXPIRED"})
PROBE_BACKOFF = (2.0, 180.0)
# A pause within this long of a resume goes on with the backoff where it was.
REPAUSE_WINDOW = 60.0


def is_account_refusal(error: CastError) -> bool:
    """Whether Cast's answer is about the account rather than the message (SPEC §5)."""
    return error.code in ACCOUNT_REFUSALS and error.http_status in (401, 402, 403)


@dataclasses.dataclass
class Pause:
    """One paused account: why (Cast's error_code) and since when (wall clock)."""

    account: str
    code: str
    since: float
    probes: int = 0
    credits: float | None = None  # the last balance read
    credits_at_pause: float | None = None
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def reason(self) -> str:
        """GHL's error text of a message that waited for this account past its deadline."""
        what = ACCOUNT_REFUSALS[self.code][0]
        since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.since))
        return f"Cast account {self.account} {what} since {since} ({self.code}); not sent"

    @property
    def fix(self) -> str:
        fix = ACCOUNT_REFUSALS[self.code][1]
        if self.code in KEY_REFUSALS:
            fix += " (cast.api_key or cast.locations.<id>.api_key) and reload castghld"
        return fix


Spawn = Callable[[Coroutine[Any, Any, None]], None]


class AccountStates:
    """The paused Cast accounts of the process (see the module docstring).

    The owner (castghld.outbound) gives: `lanes` (pause_lane/resume_lane by account name, the
    scheduler), `expire(name, pause)` (fail those past their deadline; seconds until the next
    deadline, or None) and `spawn`. `waiting(name)`, the messages waiting on the account for the
    pause and resume lines, is read from castghld.credits' index (the daemon wires it): no pass
    over a 100k backlog at a pause.
    """

    def __init__(
        self,
        cast: CastClient,
        metrics: Metrics,
        lanes: Any,
        expire: Callable[[str, Pause], float | None],
        spawn: Spawn,
    ):
        self.cast = cast
        self.metrics = metrics
        self.lanes = lanes
        self.waiting: Callable[[str], int] = lambda _name: 0  # until the daemon wires the index
        self._expire = expire
        self._spawn = spawn
        self.paused: dict[str, Pause] = {}
        self._epochs: dict[str, int] = {}
        self._resumed: dict[str, tuple[float, int]] = {}  # name -> (when, probes), for re-pauses
        self.balances: dict[str, tuple[float | None, float]] = {}  # name -> (credits, read at)
        self._sends: dict[str, collections.deque[list[int]]] = {}  # name -> [[minute, count]]
        cast.on_key_change.append(self.key_changed)
        self.export_zeros()

    def export_zeros(self) -> None:
        """`castghld_cast_account_paused` at 0 for every configured account and account refusal
        from the start (and after a reload adds an account): an alert sees a series go to 1, not
        appear at 1."""
        for name in self.cast.account_names():
            for code in ACCOUNT_REFUSALS:
                gauge = self.metrics.account_paused.labels(name, code)
                if name not in self.paused or self.paused[name].code != code:
                    gauge.set(0)

    def record_send(self, name: str) -> None:
        """One message Cast took on the account (for `sends_last_hour`)."""
        minute = int(time.time() // 60)
        minutes = self._sends.setdefault(name, collections.deque())
        if minutes and minutes[-1][0] == minute:
            minutes[-1][1] += 1
        else:
            minutes.append([minute, 1])
            while minutes[0][0] <= minute - 60:
                minutes.popleft()

    def sends_last_hour(self, name: str) -> int:
        since = int(time.time() // 60) - 60
        return sum(count for minute, count in self._sends.get(name, ()) if minute > since)

    async def read(self, account: CastAccount) -> dict[str, Any]:
        """The account's balance and approved sender IDs as Cast answers now (errors as
        ``{"error": "<status> <code>"}``)."""
        try:
            balance = await self.cast.account_info(account, "balance")
            self.balances[account.name] = (_number(balance.get("credits")), time.time())
            sender_ids = await self.cast.account_info(account, "sender-ids")
        except CastError as e:
            return {"error": e.summary}
        listed = sender_ids.get("sender_ids")
        approved = [
            str(s.get("sender_id"))
            for s in (listed if isinstance(listed, list) else [])
            if isinstance(s, dict) and s.get("channel", "sms") == "sms"
        ]
        return {"approved_sender_ids": approved}

    def epoch(self, name: str) -> int:
        """How many times the account resumed in this process."""
        return self._epochs.get(name, 0)

    def pause(self, account: CastAccount, error: CastError) -> Pause:
        """Pause `account` for Cast's account refusal `error` (a no-op when paused already)."""
        pause = self.paused.get(account.name)
        if pause is not None:
            return pause
        pause = Pause(account.name, error.code, time.time())
        resumed = self._resumed.get(account.name)
        if resumed is not None and time.monotonic() - resumed[0] < REPAUSE_WINDOW:
            pause.probes = resumed[1]
        self.paused[account.name] = pause
        self.cast.paused.add(account.name)
        self.lanes.pause_lane(account.name)
        self.metrics.account_paused.labels(account.name, error.code).set(1)
        log.error(
            "Cast account %s paused: %s %s (%s)%s; %d message(s) wait, none is failed before "
            "its send deadline; fix: %s. Sends resume by themselves once Cast shows it fixed.",
            account.name,
            error.http_status,
            error.code,
            error.message,
            " (sandbox key)" if account.sandbox else "",
            self.waiting(account.name),
            pause.fix,
            extra={"account": account.name, "reason": error.code, "outcome": "paused"},
        )
        self._spawn(self._watch(pause))
        return pause

    def key_changed(self, old_name: str, new_name: str) -> None:
        """A reload gave the account a new key: resume it at once (the next send tells). An
        unnamed account changes name with its key: the new name goes on from the old one's
        epoch, past the resume."""
        if old_name != new_name:
            self._epochs[new_name] = max(self.epoch(new_name), self.epoch(old_name) + 1)
        for name in {old_name, new_name}:
            pause = self.paused.get(name)
            if pause is not None:
                pause.wake.set()

    def resume(self, pause: Pause, why: str) -> None:
        if self.paused.get(pause.account) is not pause:
            return
        del self.paused[pause.account]
        self.cast.paused.discard(pause.account)
        self._epochs[pause.account] = self.epoch(pause.account) + 1
        self._resumed[pause.account] = (time.monotonic(), pause.probes)
        self.metrics.account_paused.labels(pause.account, pause.code).set(0)
        log.info(
            "Cast account %s resumed after %.0fs paused for %s: %s; %d message(s) waiting go out",
            pause.account,
            time.time() - pause.since,
            pause.code,
            why,
            self.waiting(pause.account),
            extra={"account": pause.account, "reason": pause.code, "outcome": "resumed"},
        )
        self.lanes.resume_lane(pause.account)

    # -- the probe -----------------------------------------------------------------------------

    async def _watch(self, pause: Pause) -> None:
        """Probe with backoff until the account is fixed (or its key changes); meanwhile fail
        the messages whose send deadline passes."""
        next_probe = time.monotonic() + backoff_delay(pause.probes, *PROBE_BACKOFF)
        while self.paused.get(pause.account) is pause:
            next_deadline = self._expire(pause.account, pause)
            wait = next_probe - time.monotonic()
            if next_deadline is not None:
                wait = min(wait, next_deadline)
            try:
                await asyncio.wait_for(pause.wake.wait(), max(0.0, wait))
            except asyncio.TimeoutError:
                pass
            if pause.wake.is_set():
                self.resume(pause, "its API key was changed by a reload")
                return
            if time.monotonic() < next_probe:
                continue
            fixed = await self._probe(pause)
            if fixed:
                self.resume(pause, fixed)
                return
            pause.probes += 1
            next_probe = time.monotonic() + backoff_delay(pause.probes, *PROBE_BACKOFF)

    async def _probe(self, pause: Pause) -> str:
        """What Cast shows that fixes the pause ("" while it does not)."""
        account = self.cast.account_names().get(pause.account)
        if account is None:
            return "the account is no longer configured"
        try:
            balance = await self.cast.account_info(account, "balance")
            profile = {}
            if pause.code in ("CREDIT_LIMIT_REACHED", "USER_INACTIVE", "CHANNEL_NOT_ALLOWED"):
                profile = await self.cast.account_info(account, "profile")
        except CastError as e:
            log.debug("probe of Cast account %s: %d %s", pause.account, e.status, e.code)
            return ""
        credits = _number(balance.get("credits"))
        pause.credits = credits
        self.balances[pause.account] = (credits, time.time())
        if pause.credits_at_pause is None:
            pause.credits_at_pause = credits
        return _fixed(pause, credits, profile)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):  # an integer too large for a float is no balance
        return None


def _fixed(pause: Pause, credits: float | None, profile: dict[str, Any]) -> str:
    """Whether the balance (and profile) read show the reason of `pause` gone: why, or ""."""
    if pause.code == "INSUFFICIENT_CREDITS":
        return f"credits {credits:g}" if credits is not None and credits > 0 else ""
    if pause.code == "CREDIT_LIMIT_REACHED":
        limit = _number(profile.get("credit_limit"))
        if credits is not None and limit is not None and credits > -limit:
            return f"credits {credits:g}, above the postpaid limit -{limit:g}"
        start = pause.credits_at_pause
        if credits is not None and start is not None and credits > start:
            return f"credits {credits:g}, up from {start:g}"
        return ""
    if pause.code == "CHANNEL_NOT_ALLOWED":
        channels = profile.get("allowed_channels")
        if not isinstance(channels, list):  # the profile cannot tell: the next send will
            return "the profile does not list the allowed channels"
        return "the sms channel is allowed" if "sms" in channels else ""
    if pause.code == "USER_INACTIVE":
        return "the account is active" if profile.get("is_active") is not False else ""
    return "Cast accepts its key from this address"

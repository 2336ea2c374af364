"""Cast credits, seen before they run out: each account's balance, and the parts its waiting
messages will need.

- `BalancePoller` reads every configured Cast account's balance (``GET /api/v1/account/balance``)
  and profile (``billing_type``) at start and every ``cast.balance_interval`` (a reload applies a
  new interval from the next read), and exports ``castghld_cast_credits{account}`` (negative on
  a postpaid account: usage owed), its read time and ``castghld_cast_postpaid{account}``.
  `BalancePoller.record` takes a balance read elsewhere (an account's probe). A read that fails
  keeps the last value (its read time shows how old it is) and is logged at warning once per
  change of Cast's answer; a sandbox key (``cast_test_...``) is named as such at start.
- `WaitingParts` keeps ``castghld_cast_credits_needed{account}``: the parts (counted as Cast
  counts them, `castghld.parts`, attachment links included: `castghld.records.sms_text`) of the
  outbound messages that wait for their send (stage ``new``), per account. It follows the outbox
  (`Outbox.watchers`) record by record: a scrape reads a sum, never walks the backlog. The
  records already waiting at start are counted in slices on the loop (`REBUILD_SLICE` per step),
  so 100k of them do not stall it.

Which alerts use them: ``config/alerts.yml``, group ``castghld-cast-credits``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from castghld.cast import CastAccount, CastClient, CastError, answer_summary
from castghld.config import Config
from castghld.metrics import Metrics
from castghld.outbox import Outbox, Record
from castghld.parts import message_parts
from castghld.periodic import PeriodicWaits
from castghld.records import KIND, Stage, sms_text

log = logging.getLogger("castghld.credits")

REBUILD_SLICE = 2000  # waiting records counted per loop step at start (~10 us each)


def configured_accounts(config: Config) -> list[tuple[str, CastAccount]]:
    """(config key, account) of each configured Cast key, once each (see online.cast_accounts)."""
    from castghld.online import cast_accounts

    return cast_accounts(config)


def account_label(account: CastAccount) -> str:
    """How logs name an account: its name, and ``(sandbox key)`` for a ``cast_test_`` key."""
    return account.name + (" (sandbox key)" if account.sandbox else "")


class BalancePoller:
    """Reads every configured account's balance on a schedule (see the module docstring)."""

    def __init__(self, config: Config, cast: CastClient, metrics: Metrics):
        self._periods = PeriodicWaits()  # the poll's wait; a reload re-measures it
        self.config = config
        self.cast = cast
        self.metrics = metrics
        # account name -> (credits, epoch seconds of the read): for `castghld accounts`.
        self.balances: dict[str, tuple[int, float]] = {}
        self.billing_types: dict[str, str] = {}
        self._last_problem: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """Set at start and by each reload (`Daemon.config_holders`)."""
        self._config = config
        self._periods.config_changed()

    async def start(self) -> None:
        for where, account in configured_accounts(self.config):
            # Series at 0 from the first scrape: increase() sees the first charge.
            self.metrics.parts_charged.labels(account.name)
            self.metrics.credits_needed.labels(account.name).set(0)
            if account.sandbox:
                log.warning(
                    "Cast account %s (%s) uses a sandbox key: Cast delivers "
                    "nothing and charges nothing",
                    account.name,
                    where,
                )
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.read_all()
            # A reload (a new `config`) re-measures the wait: a shorter interval applies at once.
            await self._periods.wait(lambda: self.config.cast.balance_interval)

    async def read_all(self) -> None:
        """One read of every configured account (one after the other: a few requests)."""
        for _where, account in configured_accounts(self.config):
            await self.read(account)

    async def read(self, account: CastAccount) -> int | None:
        """Read `account`'s balance (and billing type); its credits, or None if Cast did not
        give them."""
        try:
            answer = await self.cast.account_info(account, "balance")
            profile = await self.cast.account_info(account, "profile")
        except CastError as e:
            # Without an answer the message says so itself ("no answer from Cast: ...").
            answered = "" if e.http_status == 599 else f"{answer_summary(e.http_status, e.code)}: "
            self._problem(account, answered + e.message)
            return None
        credits = answer.get("credits")
        if type(credits) is not int:
            self._problem(account, "the balance answer has no integer credits")
            return None
        billing_type = profile.get("billing_type")
        if isinstance(billing_type, str):
            self.billing_types[account.name] = billing_type
            self.metrics.postpaid.labels(account.name).set(billing_type == "postpaid")
        first = account.name not in self.balances
        self.record(account.name, credits)
        if first or self._last_problem.pop(account.name, None) is not None:
            log.info(
                "Cast account %s: %d credits (%s)",
                account_label(account),
                credits,
                self.billing_types.get(account.name, "billing type unknown"),
                extra={"outcome": "balance"},
            )
        return credits

    def take_reads(self, reads: dict[str, tuple[float | None, float]]) -> None:
        """Balances read elsewhere (a paused account's probe, `castghld accounts`: name ->
        (credits, read at)) that are newer than ours: the gauge shows the latest."""
        for name, (credits, when) in list(reads.items()):
            if credits is not None and when > self.balances.get(name, (0, 0.0))[1]:
                self.record(name, int(credits), when)

    def record(self, account: str, credits: int, when: float | None = None) -> None:
        """A balance of `account` (its name) read now or at `when` (a probe's read)."""
        when = time.time() if when is None else when
        self.balances[account] = (credits, when)
        self.metrics.credits.labels(account).set(credits)
        self.metrics.credits_read.labels(account).set(when)

    def _problem(self, account: CastAccount, problem: str) -> None:
        if self._last_problem.get(account.name) != problem:
            self._last_problem[account.name] = problem
            log.warning(
                "Cast account %s: cannot read the balance: %s (castghld_cast_credits keeps "
                "its last value)",
                account_label(account),
                problem,
            )


class WaitingParts:
    """The parts the waiting outbound messages need, per account (see the module docstring).
    `account_of(record)` names the account a waiting record will be sent through."""

    def __init__(self, metrics: Metrics, account_of: Callable[[Record], str]):
        self.metrics = metrics
        self.account_of = account_of
        self._parts: dict[str, dict[str, int]] = {}  # account -> {record id: parts}
        self._sums: dict[str, int] = {}
        self._rebuild: asyncio.Task | None = None
        metrics.before_scrape.append(self.update_metrics)

    def watch(self, outbox: Outbox) -> None:
        """Follow `outbox` from now on, and count what already waits in it in slices."""
        outbox.watchers.append(self.changed)
        self._rebuild = asyncio.ensure_future(self._count_existing(outbox))

    async def stop(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
            await asyncio.gather(self._rebuild, return_exceptions=True)

    def needed(self, account: str) -> int:
        return self._sums.get(account, 0)

    def waiting(self, account: str) -> int:
        """How many messages wait for their send on `account`."""
        return len(self._parts.get(account, ()))

    def changed(self, rid: str, record: Record | None) -> None:
        """An outbox watcher: `record` (None: gone) is the record `rid` now is. It runs inside
        the outbox's add (the webhook's ack) and every update: an error here is logged and the
        record left out of the sums, never raised into them."""
        try:
            self._change(rid, record)
        except Exception:
            log.exception("credits: cannot count the parts of %s; left out of the sums", rid)
            self._drop(rid)

    def _change(self, rid: str, record: Record | None) -> None:
        if record is not None and _waits(record):
            account = self.account_of(record)
            held = self._parts.get(account)
            if held is not None and rid in held:
                return  # still waiting, same account: a record's text never changes
            self._drop(rid)
            parts = message_parts(sms_text(record))  # type: ignore[arg-type]
            self._parts.setdefault(account, {})[rid] = parts
            self._sums[account] = self._sums.get(account, 0) + parts
        else:
            self._drop(rid)

    def _drop(self, rid: str) -> None:
        for account, held in self._parts.items():
            parts = held.pop(rid, None)
            if parts is not None:
                self._sums[account] -= parts
                return

    async def _count_existing(self, outbox: Outbox) -> None:
        rids = list(outbox.records)
        for start in range(0, len(rids), REBUILD_SLICE):
            for rid in rids[start : start + REBUILD_SLICE]:
                record = outbox.records.get(rid)
                if record is not None:
                    self.changed(rid, record)
            await asyncio.sleep(0)

    def update_metrics(self) -> None:
        for account, total in self._sums.items():
            self.metrics.credits_needed.labels(account).set(total)


def _waits(record: dict[str, Any]) -> bool:
    """An outbound record waiting for its send, that Cast will be asked to send."""
    return (
        record.get("kind") == KIND
        and record.get("stage") == Stage.NEW
        and record.get("type", "SMS") == "SMS"
        and not record.get("refused")
    )


class CastCredits:
    """The daemon component: the balance reads and the waiting parts of every account.
    `account_of(record)` names the account a waiting record will be sent through."""

    def __init__(
        self,
        config: Config,
        cast: CastClient,
        metrics: Metrics,
        outbox: Outbox,
        account_of: Callable[[Record], str],
    ):
        self.outbox = outbox
        self.balances = BalancePoller(config, cast, metrics)
        self.waiting = WaitingParts(metrics, account_of)
        # The balances other parts read (castghld.accounts' probes), shown at each scrape.
        self.other_reads: dict[str, tuple[float | None, float]] = {}
        metrics.before_scrape.append(lambda: self.balances.take_reads(self.other_reads))

    async def start(self) -> None:
        self.waiting.watch(self.outbox)  # before the outbox dispatches anything
        await self.balances.start()

    async def stop(self) -> None:
        await self.balances.stop()
        await self.waiting.stop()

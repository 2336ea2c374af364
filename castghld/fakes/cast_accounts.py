"""Fake Cast's account side (SPEC §5 Account): wallets, key and account switches, and the
``/api/v1/account/*`` routes.

Every account has a `FakeCastAccount`, made on first use. Without `FakeCast.set_credits` an
account has no wallet: its sends are never refused for credits and its balance reads
`UNLIMITED_CREDITS`, so a test that does not care about credits sees the fake as before. With a
wallet, a send spends the parts Cast would charge (`castghld.parts.message_parts`): a ``topup``
account refuses a send it cannot pay with 402 ``INSUFFICIENT_CREDITS``, a ``postpaid`` account
goes negative down to ``-credit_limit`` and then refuses with 402 ``CREDIT_LIMIT_REACHED``.

The switches tests use (each answers what Cast answers, on every route of the key or account):
`revoke_key` (403 ``API_KEY_REVOKED``), `expire_key` (403 ``API_KEY_EXPIRED``), `deactivate`
(403 ``USER_INACTIVE``), `refuse_ip` (403 ``IP_NOT_WHITELISTED``), `allow_channels` without
``sms`` (403 ``CHANNEL_NOT_ALLOWED`` on sends), `add_key` (a second key of the same account: a key
rotation, both valid). None of these answers is a contract violation: a correct client meets them.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from castghld.fakes.server import Answer, Call, _Reject

UNLIMITED_CREDITS = 1_000_000
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
BILLING_TYPES = ("topup", "postpaid")


def _digits(number: str) -> str:
    """A PH number in any form (+639..., 639..., 09...) as its 10 national digits."""
    digits = re.sub(r"\D", "", number)
    return digits[-10:]


def cast_error(status: int, error: str, code: str) -> dict[str, Any]:
    return {"success": False, "error": error, "error_code": code}


@dataclass
class FakeCastAccount:
    """One Cast account: its wallet (``credits`` None: no wallet, never refused) and its state."""

    name: str
    credits: int | None = None
    billing_type: str = "topup"
    credit_limit: int = 0
    currency: str = "PHP"
    allowed_channels: list[str] = field(default_factory=lambda: ["sms", "otp", "bulk"])
    is_active: bool = True
    ip_allowed: bool = True
    sender_ids: list[dict[str, str]] = field(default_factory=list)
    unsubscribed: list[dict[str, str]] = field(default_factory=list)

    @property
    def balance(self) -> int:
        return UNLIMITED_CREDITS if self.credits is None else self.credits


class FakeCastAccounts:
    """The account half of `FakeCast` (a mixin: it uses FakeCast's ``api_keys``, ``sent`` and
    ``_account``)."""

    api_keys: dict[str, str]
    sent: list[dict[str, Any]]

    def _init_accounts(self) -> None:
        self.accounts: dict[str, FakeCastAccount] = {}
        self.revoked_keys: set[str] = set()
        self.expired_keys: set[str] = set()
        self.refusals: Counter[str] = Counter()  # refused sends by error_code

    # -- switches ------------------------------------------------------------------------------

    def account(self, name: str) -> FakeCastAccount:
        """The account `name` (made on first use)."""
        if name not in self.accounts:
            self.accounts[name] = FakeCastAccount(name)
        return self.accounts[name]

    def set_credits(
        self, account: str, credits: int, billing_type: str = "topup", credit_limit: int = 0
    ) -> None:
        """Give `account` a wallet of `credits` parts (postpaid: may go to ``-credit_limit``)."""
        if billing_type not in BILLING_TYPES:
            raise ValueError(f"billing_type must be one of {BILLING_TYPES}")
        acct = self.account(account)
        acct.credits, acct.billing_type, acct.credit_limit = credits, billing_type, credit_limit

    def top_up(self, account: str, credits: int) -> None:
        acct = self.account(account)
        acct.credits = (acct.credits or 0) + credits

    def add_key(self, api_key: str, account: str) -> None:
        """Another valid key of `account` (a rotation: the old key stays valid until revoked)."""
        self.api_keys[api_key] = account

    def revoke_key(self, api_key: str) -> None:
        self.revoked_keys.add(api_key)

    def expire_key(self, api_key: str) -> None:
        self.expired_keys.add(api_key)

    def deactivate(self, account: str, inactive: bool = True) -> None:
        self.account(account).is_active = not inactive

    def refuse_ip(self, account: str, refused: bool = True) -> None:
        self.account(account).ip_allowed = not refused

    def allow_channels(self, account: str, channels: list[str]) -> None:
        self.account(account).allowed_channels = list(channels)

    def set_sender_ids(self, account: str, sender_ids: list[dict[str, str]]) -> None:
        """The approved sender IDs of `account`: ``[{sender_id, label, channel}]``."""
        self.account(account).sender_ids = [dict(s) for s in sender_ids]

    def unsubscribe(self, account: str, phone: str, sender_id: str) -> None:
        """`phone` opted out of `sender_id` (listed by ``/account/unsubscribed``)."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        entry = {"phone": phone, "sender_id": sender_id, "unsubscribed_at": now, "ip": "127.0.0.1"}
        self.account(account).unsubscribed.append(entry)

    def today(self) -> str:
        """The date a send is counted under in ``/account/usage`` (tests may replace it)."""
        return datetime.datetime.now(datetime.timezone.utc).date().isoformat()

    # -- refusals ------------------------------------------------------------------------------

    def _key_refusal(self, api_key: str, account: str) -> Answer | None:
        """What Cast answers every request made with this key, before the route's own work."""
        acct = self.account(account)
        if api_key in self.revoked_keys:
            return Answer(403, cast_error(403, "API key has been revoked", "API_KEY_REVOKED"))
        if api_key in self.expired_keys:
            return Answer(403, cast_error(403, "API key has expired", "API_KEY_EXPIRED"))
        if not acct.is_active:
            return Answer(403, cast_error(403, "User account is inactive", "USER_INACTIVE"))
        if not acct.ip_allowed:
            text = "IP address is not whitelisted"
            return Answer(403, cast_error(403, text, "IP_NOT_WHITELISTED"))
        return None

    def _channel_refusal(self, account: str) -> Answer | None:
        if "sms" in self.account(account).allowed_channels:
            return None
        text = "Channel sms is not allowed for this account"
        return Answer(403, cast_error(403, text, "CHANNEL_NOT_ALLOWED"))

    def _charge(self, account: str, parts: int) -> Answer | None:
        """Spend `parts` credits of `account`'s wallet, or the 402 that refuses the send."""
        acct = self.account(account)
        if acct.credits is None:
            return None
        if acct.billing_type == "postpaid":
            if acct.credits - parts < -acct.credit_limit:
                text = "Credit limit reached"
                return Answer(402, cast_error(402, text, "CREDIT_LIMIT_REACHED"))
        elif acct.credits < parts:
            return Answer(402, cast_error(402, "Insufficient credits", "INSUFFICIENT_CREDITS"))
        acct.credits -= parts
        return None

    # -- opt-outs (a send to a number that opted out of its sender ID) -------------------------
    # Cast blocks such sends (SPEC §5 Account, unsubscribed) without documenting the error code:
    # the fake answers the documented message-level one, 400 VALIDATION_ERROR.

    def _opt_out_refusal(self, account: str, body: dict[str, Any]) -> Answer | None:
        """400 when `body`'s number opted out of its sender ID (any of the account's sender IDs
        when the send names none: Cast would send with the account's own)."""
        to = _digits(body["to"])
        sender_id = body.get("sender_id")
        for entry in self.account(account).unsubscribed:
            if _digits(entry["phone"]) == to and sender_id in (None, entry["sender_id"]):
                text = "Recipient has unsubscribed from this sender ID"
                return Answer(400, cast_error(400, text, "VALIDATION_ERROR"))
        return None

    # -- GET /api/v1/account/* -----------------------------------------------------------------

    def _authorized(self, call: Call, route: str) -> FakeCastAccount:
        api_key, account = self._caller(call)  # type: ignore[attr-defined]
        refusal = self._key_refusal(api_key, account)
        if refusal is not None:
            raise _Reject(refusal)
        self._take_failure(route)  # type: ignore[attr-defined]
        return self.account(account)

    def _balance(self, call: Call) -> Answer:
        acct = self._authorized(call, "balance")
        return Answer(200, {"success": True, "credits": acct.balance, "currency": acct.currency})

    def _profile(self, call: Call) -> Answer:
        acct = self._authorized(call, "profile")
        return Answer(
            200,
            {
                "success": True,
                "name": acct.name,
                "credits": acct.balance,
                "currency": acct.currency,
                "billing_type": acct.billing_type,
                "credit_limit": acct.credit_limit,
                "allowed_channels": list(acct.allowed_channels),
                "is_active": acct.is_active,
            },
        )

    def _usage(self, call: Call) -> Answer:
        acct = self._authorized(call, "usage")
        first, last = self._usage_range(call)
        daily: dict[str, Counter[str]] = {}
        for record in self.sent:
            if record["account"] != acct.name or not first <= record["date"] <= last:
                continue
            day = daily.setdefault(record["date"], Counter())
            failed = self._delivery(record)[0] == "failed"  # type: ignore[attr-defined]
            day["total"] += 1
            day["failed" if failed else "sent"] += 1
            day["parts"] += record["parts"]
        rows = [
            {"date": d, **{k: c[k] for k in ("total", "sent", "failed", "parts")}}
            for d, c in sorted(daily.items(), reverse=True)
        ]
        totals = {k: sum(r[k] for r in rows) for k in ("total", "sent", "failed", "parts")}
        return Answer(
            200,
            {
                "success": True,
                "total": totals["total"],
                "total_sent": totals["sent"],
                "total_failed": totals["failed"],
                "total_parts": totals["parts"],
                "daily": rows,
            },
        )

    def _usage_range(self, call: Call) -> tuple[str, str]:
        """``from``/``to`` (YYYY-MM-DD, inclusive); the last 30 days by default."""
        today = datetime.date.fromisoformat(self.today())
        first = call.query.get("from") or (today - datetime.timedelta(days=29)).isoformat()
        last = call.query.get("to") or today.isoformat()
        for name, value in (("from", first), ("to", last)):
            if not DATE.fullmatch(value):
                text = f"{name} must be YYYY-MM-DD"
                self._violate(call, 400, text, cast_error(400, text, "VALIDATION_ERROR"))  # type: ignore[attr-defined]
        return first, last

    def _sender_ids(self, call: Call) -> Answer:
        acct = self._authorized(call, "sender_ids")
        return Answer(200, {"success": True, "sender_ids": [dict(s) for s in acct.sender_ids]})

    def _unsubscribed(self, call: Call) -> Answer:
        acct = self._authorized(call, "unsubscribed")
        return Answer(200, {"success": True, "data": [dict(u) for u in acct.unsubscribed]})

    account_routes = (
        ("GET", r"/api/v1/account/balance", "balance", "_balance"),
        ("GET", r"/api/v1/account/profile", "profile", "_profile"),
        ("GET", r"/api/v1/account/usage", "usage", "_usage"),
        ("GET", r"/api/v1/account/sender-ids", "sender_ids", "_sender_ids"),
        ("GET", r"/api/v1/account/unsubscribed", "unsubscribed", "_unsubscribed"),
    )

"""Fake Cast: the SMS send, delivery-status, logs and account API castghld uses (SPEC §5), with
idempotency keys, per-account send limits, a per-client request limit, and the wallets and account
switches of `castghld.fakes.cast_accounts`.

`FakeCast` keeps its parts in this order: the state and the methods tests script it with, the
checks every route makes (`_account`: request limit, then API key), one section per route with
its handler, and the route table at the end. A new endpoint is a handler section (authenticate
with `_account`, answer breaches with `_violate`, call `_take_failure(route)` before changing
state) plus one row in the table.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import secrets
import time
from collections import Counter, defaultdict, deque
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from castghld.fakes.cast_accounts import FakeCastAccounts
from castghld.fakes.server import (
    DROP_CONNECTION,
    Answer,
    Call,
    _FakeServer,
    _prune,
    _Reject,
    max_in_window,
)
from castghld.parts import message_parts

PH_MOBILE = re.compile(r"\+639\d{9}|09\d{9}")
CAST_SEND_FIELDS = frozenset(("to", "message", "sender_id"))
CAST_ERROR_CODES = {
    400: "VALIDATION_ERROR",
    401: "INVALID_API_KEY",
    402: "INSUFFICIENT_CREDITS",
    403: "API_KEY_REVOKED",
    404: "NOT_FOUND",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMIT_EXCEEDED",
    500: "INTERNAL_ERROR",
    502: "PROVIDER_ERROR",
    503: "SERVICE_UNAVAILABLE",
}
DEFAULT_DLR = {"delivered": "DELIVRD", "undelivered": "UNDELIV", "failed": "UNDELIV"}


def _cast_error(status: int, error: str, code: str | None = None) -> dict[str, Any]:
    code = code or CAST_ERROR_CODES.get(status, "INTERNAL_ERROR")
    return {"success": False, "error": error, "error_code": code}


def _ph_key(number: str) -> str:
    """+63 form of a PH number in any form, to match numbers across forms."""
    digits = re.sub(r"\D", "", number)
    return "+63" + digits[1:] if digits.startswith("0") else "+" + digits


class FakeCast(FakeCastAccounts, _FakeServer):
    """Cast's send, delivery-status and account API, with idempotency keys and rate limits.

    `idempotency_scope`: Cast keeps an ``X-Idempotency-Key``'s first answer per API key (SPEC
    §5, ``"key"``, the default); ``"account"`` shares it between the keys of one account. With
    one key per account both are the same. `cache_refusals`: whether an account refusal (402,
    403) answered to a send is kept under its idempotency key and replayed to it, like a success,
    after the account was fixed (Cast's doc does not say; default False: refusals are not kept).
    `lookup_scope`: who may read a message's delivery status: any key of its account
    (``"account"``, the default, SPEC §5 404 "another account's") or only the key that sent it
    (``"key"``: other keys get 404).
    """

    def __init__(
        self,
        api_keys: dict[str, str] | None = None,
        messages_per_second: int = 10,
        requests_per_second: int = 30,
        default_delivery: str = "delivered",
        delivery_delay: float = 0.0,
        ip_burst: int | None = None,
    ) -> None:
        super().__init__()
        self.api_keys = dict(api_keys or {"cast_test_key": "acct"})  # API key -> account
        self.messages_per_second = messages_per_second
        self.requests_per_second = requests_per_second
        self.default_delivery = default_delivery
        self.delivery_delay = delivery_delay
        self.idempotency_scope = "key"
        self.cache_refusals = False
        self.lookup_scope = "account"
        self._init_accounts()
        self.sent: list[dict[str, Any]] = []
        self.replays = 0
        self.error_cache_seconds = 0.0
        self.cached_error_replays = 0
        self._cached_errors: dict[tuple[str, str], tuple[Answer, float]] = {}  # by _scope
        self.status_polls: Counter[str] = Counter()
        self._answers: dict[tuple[str, str], tuple[dict[str, Any], Answer]] = {}
        self._by_id: dict[str, dict[str, Any]] = {}
        self._deliveries: dict[str, tuple[str, str | None, str | None]] = {}
        self._requests: deque[float] = deque()
        self._send_times: defaultdict[str, deque[float]] = defaultdict(deque)
        # GET /api/v1/sms/logs: off by default (answered 404, as a Cast without it would).
        self.logs_enabled = False
        # Cast's documented per-IP limit is a bucket: `requests_per_second` with bursts of
        # `ip_burst` (50). None: the stricter "at most requests_per_second in any 1 s".
        self.ip_burst = ip_burst
        self._ip_tokens = (float(ip_burst or 0), time.monotonic())

    def set_delivery(
        self,
        message_id_or_to: str,
        status: str,
        dlr_status: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """Delivery status of one Cast message id, or of every message to a number (any form)."""
        key = message_id_or_to if message_id_or_to.startswith("CAST") else _ph_key(message_id_or_to)
        self._deliveries[key] = (status, dlr_status or DEFAULT_DLR.get(status), error_message)

    def max_sends_in_window(self, window: float = 1.0, account: str | None = None) -> int:
        """The most sends (of `account`, or of all) that fell within any `window` seconds."""
        return max_in_window(
            [s["time"] for s in self.sent if account is None or s["account"] == account], window
        )

    async def post_inbound(
        self, url: str, secret: str, payload: dict[str, Any], raise_error: bool = False
    ) -> HTTPResponse:
        """POST a received SMS to castghld as Cast does (SPEC §5 Inbound)."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}
        request = HTTPRequest(url, method="POST", body=json.dumps(payload), headers=headers)
        return await AsyncHTTPClient().fetch(request, raise_error=raise_error)

    # -- every route: error body, request limit, API key ---------------------------------------

    def _error_body(self, status: int, message: str) -> Any:
        return _cast_error(status, message)

    def send_outside(self, account: str, to: str, message: str) -> str:
        """A message sent on `account` by something other than castghld; its Cast message id."""
        body = {"to": to, "message": message}
        answer = self._deliver(account, "", "outside-" + secrets.token_hex(4), body)
        return answer.body["message_id"]

    def _caller(self, call: Call) -> tuple[str, str]:
        """The per-IP request limit, then the API key; (the key, its account)."""
        now = time.monotonic()
        _prune(self._requests, 1.0, now)
        self._requests.append(now)
        if self.ip_burst is not None:
            self._take_ip_token(call, now)
        elif len(self._requests) > self.requests_per_second:
            text = f"more than {self.requests_per_second} requests in 1 s"
            self._violate(call, 429, text, headers={"Retry-After": "1"})
        key = call.headers.get("X-API-Key")
        if not key:
            self._violate(call, 401, "no X-API-Key header", _cast_error(401, "Invalid API key"))
        if key not in self.api_keys:
            raise _Reject(Answer(401, _cast_error(401, "Invalid API key")))
        return key, self.api_keys[key]

    def _scope(self, api_key: str, account: str, idempotency_key: str) -> tuple[str, str]:
        """Where an idempotency key's first answer is kept (`idempotency_scope`)."""
        owner = "key:" + api_key if self.idempotency_scope == "key" else "account:" + account
        return owner, idempotency_key

    def _take_ip_token(self, call: Call, now: float) -> None:
        """The per-IP bucket: refilled at `requests_per_second`, holding at most `ip_burst`."""
        assert self.ip_burst is not None
        tokens, then = self._ip_tokens
        tokens = min(float(self.ip_burst), tokens + (now - then) * self.requests_per_second)
        if tokens < 1.0:
            self._ip_tokens = (tokens, now)
            text = f"more than {self.requests_per_second} requests/s (burst {self.ip_burst})"
            self._violate(call, 429, text, headers={"Retry-After": "1"})
        self._ip_tokens = (tokens - 1.0, now)

    # -- POST /api/v1/sms/send -----------------------------------------------------------------

    def _send(self, call: Call) -> Answer:
        api_key, account = self._caller(call)
        body = self._send_body(call)
        key = call.headers.get("X-Idempotency-Key", "")
        if not key:
            error = _cast_error(400, "X-Idempotency-Key is required", "INVALID_REQUEST")
            self._violate(call, 400, "no X-Idempotency-Key header", error)
        scope = self._scope(api_key, account, key)
        self._take_send_failure(scope)
        first = self._answers.get(scope)
        if first is not None:
            return self._replay(call, body, *first)
        refusal = self._key_refusal(api_key, account)
        if refusal is None:
            self._check_send_rate(call, account)
            parts = message_parts(body["message"])
            refusal = (
                self._channel_refusal(account)
                or self._opt_out_refusal(account, body)
                or self._charge(account, parts)
            )
        if refusal is not None:
            self.refusals[refusal.body["error_code"]] += 1
            if self.cache_refusals:
                self._answers[scope] = (body, refusal)
            return Answer(refusal.status, copy.deepcopy(refusal.body))
        answer = self._deliver(account, api_key, key, body)
        self._answers[scope] = (body, answer)
        return answer

    def _take_send_failure(self, scope: tuple[str, str]) -> None:
        """A scripted or random failure; with `error_cache_seconds`, a 5xx is kept for the key."""
        now = time.monotonic()
        cached = self._cached_errors.get(scope)
        if cached is not None and cached[1] > now:
            self.cached_error_replays += 1
            answer = cached[0]
            raise _Reject(Answer(answer.status, copy.deepcopy(answer.body), dict(answer.headers)))
        try:
            self._take_failure("send")
        except _Reject as e:
            status = e.answer.status
            fresh_key = scope not in self._answers
            if self.error_cache_seconds > 0 and 500 <= status < DROP_CONNECTION and fresh_key:
                self._cached_errors[scope] = (e.answer, now + self.error_cache_seconds)
            raise

    def _send_body(self, call: Call) -> dict[str, Any]:
        body = call.json
        if not isinstance(body, dict):
            text = "body is not a JSON object (Content-Type json)"
            self._violate(call, 400, text, _cast_error(400, text, "INVALID_REQUEST"))
        unknown = sorted(set(body) - CAST_SEND_FIELDS)
        problems = [f"unknown fields {unknown}"] if unknown else []
        to, message = body.get("to"), body.get("message")
        if not isinstance(to, str) or not PH_MOBILE.fullmatch(to):
            problems.append(f"to {to!r} is not +639XXXXXXXXX or 09XXXXXXXXX")
        if not isinstance(message, str) or not 0 < len(message) <= 10000:
            problems.append("message must be a non-empty string of at most 10000 characters")
        sender_id = body.get("sender_id", "given")
        if not isinstance(sender_id, str) or not sender_id:
            problems.append("sender_id, when given, must be a non-empty string")
        if problems:
            self._violate(call, 400, "; ".join(problems))
        return body

    def _replay(self, call: Call, body: dict[str, Any], first_body: Any, first: Answer) -> Answer:
        if body != first_body:
            self._violate(call, 422, "idempotency key reused with a different body")
        self.replays += 1
        headers = {**first.headers, "X-Idempotent-Replay": "true"}
        return Answer(first.status, copy.deepcopy(first.body), headers)

    def _check_send_rate(self, call: Call, account: str) -> None:
        times = self._send_times[account]
        _prune(times, 1.0, time.monotonic())
        if len(times) >= self.messages_per_second:
            text = f"more than {self.messages_per_second} sends in 1 s for {account}"
            self._violate(call, 429, text, headers={"Retry-After": "1"})

    def _deliver(self, account: str, api_key: str, key: str, body: dict[str, Any]) -> Answer:
        message_id = "CAST" + secrets.token_hex(8).upper()
        parts = message_parts(body["message"])
        record = {
            "to": body["to"],
            "message": body["message"],
            "sender_id": body.get("sender_id"),
            "account": account,
            "api_key": api_key,
            "idempotency_key": key,
            "message_id": message_id,
            "parts": parts,
            "date": self.today(),
            "time": time.monotonic(),
        }
        self.sent.append(record)
        self._by_id[message_id] = record
        self._send_times[account].append(record["time"])
        return Answer(200, {"success": True, "message_id": message_id, "parts": parts})

    # -- GET /api/v1/sms/status/{id} -----------------------------------------------------------

    def _sms_status(self, call: Call, message_id: str) -> Answer:
        api_key, account = self._caller(call)
        refusal = self._key_refusal(api_key, account)
        if refusal is not None:
            return refusal
        self.status_polls[message_id] += 1
        self._take_failure("sms_status")
        record = self._by_id.get(message_id)
        if record is None:
            return Answer(404, _cast_error(404, "Message not found"))
        if record["account"] != account:
            self._violate(call, 404, f"{record['account']}'s message asked as {account}")
        if self.lookup_scope == "key" and record["api_key"] != api_key:
            return Answer(404, _cast_error(404, "Message not found"))
        status, dlr_status, error_message = self._delivery(record)
        return Answer(
            200,
            {
                "success": True,
                "message_id": message_id,
                "status": status,
                "dlr_status": dlr_status,
                "error_message": error_message,
            },
        )

    def _delivery(self, record: dict[str, Any]) -> tuple[str, str | None, str | None]:
        if time.monotonic() - record["time"] < self.delivery_delay:
            return "sent", None, None
        by_id = self._deliveries.get(record["message_id"])
        chosen = by_id or self._deliveries.get(_ph_key(record["to"]))
        if chosen is not None:
            return chosen
        return self.default_delivery, DEFAULT_DLR.get(self.default_delivery), None

    # -- GET /api/v1/sms/logs ------------------------------------------------------------------

    def _sms_logs(self, call: Call) -> Answer:
        """The account's messages newest first, with the text and number a real log carries and
        the receipt (``dlr_status``, ``delivered_at``) once `delivery_delay` has passed."""
        api_key, account = self._caller(call)
        refusal = self._key_refusal(api_key, account)
        if refusal is not None:
            return refusal
        if not self.logs_enabled:
            return Answer(404, _cast_error(404, "Not found"))
        query = call.query
        unknown = sorted(set(query) - {"from", "to", "status", "search", "limit", "offset"})
        day = re.compile(r"\d{4}-\d{2}-\d{2}")
        limit, offset = query.get("limit", "50"), query.get("offset", "0")
        if unknown or not all(
            day.fullmatch(query.get(k, "")) for k in ("from", "to") if k in query
        ):
            self._violate(call, 400, f"bad logs query {sorted(query)}")
        if not limit.isdigit() or not 1 <= int(limit) <= 500 or not offset.isdigit():
            self._violate(call, 400, "limit must be 1..500 and offset >= 0 (integers)")
        self._take_failure("sms_logs")
        now_wall, now = time.time(), time.monotonic()
        entries = []
        for record in reversed(self.sent):
            if record["account"] != account:
                continue
            created = datetime.datetime.fromtimestamp(
                now_wall - (now - record["time"]), datetime.timezone.utc
            )
            when = created.date().isoformat()
            if not query.get("from", when) <= when <= query.get("to", when):
                continue
            entry = self._log_entry(record, created)
            if query.get("status", entry["status"]) == entry["status"]:
                entries.append(entry)
        page = entries[int(offset) : int(offset) + int(limit)]
        return Answer(200, {"success": True, "count": len(page), "logs": page})

    def _log_entry(self, record: dict[str, Any], created: datetime.datetime) -> dict[str, Any]:
        entry = {
            "id": int(record["message_id"][4:12], 16),
            "message_type": "sms",
            "sender_id": record["sender_id"],
            "destination": record["to"],
            "message": record["message"],
            "smpp_message_id": record["message_id"],
            "status": "sent",
            "parts": message_parts(record["message"]),
            "created_at": created.isoformat().replace("+00:00", "Z"),
        }
        status, dlr_status, _ = self._delivery(record)
        if status == "failed":
            entry["status"] = "failed"
        if status != "sent":
            entry["dlr_status"] = dlr_status
            entry["delivered_at"] = entry["created_at"]
        return entry

    # -- route table: (method, path regex, route name for scripting, handler) ------------------

    routes = (
        ("POST", r"/api/v1/sms/send", "send", "_send"),
        ("GET", r"/api/v1/sms/status/(?P<message_id>[^/]+)", "sms_status", "_sms_status"),
        *FakeCastAccounts.account_routes,
        ("GET", r"/api/v1/sms/logs", "sms_logs", "_sms_logs"),
    )

"""The Cast SMS API client: sends and delivery-status lookups, paced and retried.

Guarantees:
- Every send carries ``X-Idempotency-Key`` = the GHL message id. The caller passes the same key on
  every retry and after a restart, and Cast replays its first answer for 24 h, so no retry can
  send an SMS twice.
- Sends are paced per Cast account (``cast.messages_per_second``; a location with its own
  ``api_key`` is its own account) and every Cast request of the process is paced under
  ``cast.requests_per_second`` (Cast's per-IP limit). A send takes its account slot and its IP
  slot at the same instant, right before it leaves (``acquire_all``), so sends that waited do not
  reach Cast in a bunch. Sends go first in the per-IP budget, then logs sweeps, then status
  lookups (castghld.priority); sweeps and lookups take at most half of it. We stay under the
  limits rather than discovering them through 429s; a 429 still pauses that account for its
  ``Retry-After``.
- No head-of-line blocking: the sends of one account queue (FIFO) on that account's lock, which
  is released as soon as the request has left; the ``delivery.concurrency`` semaphore is held
  from then until the answer. A busy account therefore waits on its own pace and other accounts
  share only the semaphore and the per-IP limit.
- After ``begin_stop()`` no new send starts: ``send_once`` parks until its task is cancelled (the
  outbox stop), and the message resumes at the next start.
- ``send_once`` is one attempt; the caller (the outbound scheduler) retries what SPEC §5 calls
  transient (429, 500, 502, 503, timeouts, connection errors, see ``worth_retrying``): ``502
  PROVIDER_ERROR`` (the carrier refused it) at most ``PROVIDER_ERROR_RETRIES`` times, so a
  rejected message is reported failed within minutes; anything else is final, with Cast's
  ``error_code`` for the GHL report.
- A send never leaves after its ``not_after`` (wall clock): that is checked after the pacing
  slots are taken, at the instant the request would leave, and raises ``SendWindowClosed``
  instead. A message that waited behind a backlog is not texted late, and one first attempted
  before a crash is not resent once Cast may have forgotten its idempotency key.
  ``may_leave`` is asked at that same instant (``SendWithdrawn``): a message whose location left
  while it waited for its slot is not sent.
- A status poll answered 429 pauses that account's polls for its ``Retry-After``.
- No send leaves on a paused account (`paused`, kept by castghld.accounts): that is checked at
  the instant the request would leave, like ``not_after``, and raises `AccountPaused` instead.
- An account is known by its name (``cast.account``, ``cast.locations.*.account``; unnamed: a
  hash of its key, `default_account_name`), not by its key: a reload with a new key keeps the
  account. The key a message was first sent with stays usable for that message while this process
  runs (`retired_key`): Cast keeps idempotency keys per API key, so a message that may have been
  sent is retried, and looked up, with the key it was sent with.
- The API key never appears in an error, a log line or a metric label.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from castghld.config import Config, default_account_name
from castghld.inflight import InFlight
from castghld.log import clip, is_tls_failure, redact_numbers, unanswered
from castghld.metrics import Metrics
from castghld.pacing import (
    LimiterMap,
    SlidingWindowLimiter,
    acquire_all,
    parse_retry_after,
)
from castghld.priority import LOOKUP, SWEEP, IPPriority
from castghld.retry import RETRYABLE_STATUSES

log = logging.getLogger("castghld.cast")

# The windows are a little longer than Cast's one second: requests timed here leave a few
# milliseconds apart from when Cast counts them, and jitter must not push 11 into one second.
WINDOW = 1.05
# The per-IP window: Cast allows 30 requests/s per IP with bursts of 50 (SPEC §5), so requests
# that leave bunched together after the IOLoop was busy (up to ~0.1 s late) stay within Cast's
# bucket with this window too.
IP_WINDOW = WINDOW
MAX_MESSAGE_CHARS = 10_000
# Cast's 502 PROVIDER_ERROR: the carrier refused the message; a few retries, not until the deadline.
PROVIDER_ERROR_RETRIES = 3
SANDBOX_KEY_PREFIX = "cast_test_"


class CastError(Exception):
    """A Cast answer other than success (status 599: no answer)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        http_status: int | None = None,
    ):
        super().__init__(f"Cast {answer_summary(status, code)}: {message}")
        self.status = status
        # The HTTP status Cast (or whatever answered) sent; `status` is 502 for an answer that is
        # not Cast's (a body that is not a JSON object, a 2xx/3xx without success).
        self.http_status = status if http_status is None else http_status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES

    @property
    def summary(self) -> str:
        """What Cast answered, for a log line: `503 SERVICE_UNAVAILABLE`, or `no answer`."""
        return answer_summary(self.status, self.code)


def answer_summary(status: int, code: str) -> str:
    """`402 INSUFFICIENT_CREDITS`; for 599, which is no status Cast sends (the HTTP client's code
    for a request without an answer), `no answer` or `no trusted TLS connection`."""
    if status != 599:
        return f"{status} {code}"
    return "no trusted TLS connection" if code == "TLS_FAILED" else "no answer"


def _unanswered_code(error: BaseException | None) -> str:
    """The code of a request without an answer: TLS_FAILED when the server was reached but did
    not prove it is Cast (nothing was sent), NO_ANSWER otherwise (it may have been)."""
    return "TLS_FAILED" if is_tls_failure(error) else "NO_ANSWER"


def worth_retrying(error: CastError, provider_errors: int) -> bool:
    """Whether a send that failed with `error` is retried, `provider_errors` PROVIDER_ERRORs in."""
    if error.code == "PROVIDER_ERROR" and provider_errors > PROVIDER_ERROR_RETRIES:
        return False
    return error.retryable


class SendWindowClosed(Exception):
    """The send's ``not_after`` passed before the request could leave: nothing was sent."""


class SendWithdrawn(Exception):
    """The send's ``may_leave`` said no when the request would have left: nothing was sent."""


class AccountPaused(Exception):
    """The send's account was paused before the request could leave: nothing was sent."""


@dataclasses.dataclass(frozen=True)
class CastAccount:
    """A Cast account as one location sends through it: its name (pacing, logs, the outbox),
    the API key to use and the sender ID."""

    api_key: str = dataclasses.field(repr=False)
    sender_id: str
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", default_account_name(self.api_key))

    @property
    def key_id(self) -> str:
        """Which key this is, without the key: the name an unnamed account has with it."""
        return default_account_name(self.api_key)

    @property
    def sandbox(self) -> bool:
        """A Cast sandbox key (``cast_test_...``): Cast delivers nothing and charges nothing."""
        return self.api_key.startswith(SANDBOX_KEY_PREFIX)


def configured_keys(config: Config) -> dict[str, tuple[str, str]]:
    """Each configured Cast key's entry (``cast`` or a location id) -> (account name, key)."""
    cast = config.cast
    keys = {"cast": (cast.account or default_account_name(cast.api_key.value), cast.api_key.value)}
    for location_id, o in cast.locations.items():
        if o.api_key is not None:
            key = o.api_key.value
            keys[location_id] = (o.account or default_account_name(key), key)
    return keys


class CastClient:
    def __init__(self, config: Config, metrics: Metrics):
        self._config = config
        # Keys replaced by a reload: key id -> (account name, key), for the messages sent with
        # them; and the callbacks told of an account whose key changed (its old and new name).
        self._retired: dict[str, tuple[str, str]] = {}
        self.on_key_change: list[Any] = []
        # Accounts that no send may leave on (castghld.accounts pauses and resumes them).
        self.paused: set[str] = set()
        self.base = config.cast.api_base.rstrip("/")
        self.metrics = metrics
        self.created = time.monotonic()
        self.send_limiters = LimiterMap(config.cast.messages_per_second, WINDOW)
        self.ip_limiter = SlidingWindowLimiter(config.cast.requests_per_second, IP_WINDOW)
        # Status polls never take more than half of the per-IP budget: sends keep the rest.
        self.poll_limiter = SlidingWindowLimiter(
            max(1, config.cast.requests_per_second // 2), WINDOW
        )
        # Sends first, then receipt sweeps, then single lookups (castghld.priority).
        self.priority = IPPriority(self.ip_limiter)
        self.concurrency = asyncio.Semaphore(config.delivery.concurrency)
        # One FIFO lock per account with sends waiting or leaving: [lock, users]; dropped at 0.
        self._account_locks: dict[str, list[Any]] = {}
        # Status polls of an account that Cast answered 429: held back until this monotonic time.
        self._polls_paused: dict[str, float] = {}
        self.stopping = False
        # Sends whose answer we may not have yet: shutdown waits for them (bounded).
        self.sends = InFlight()

    def quiet_start(self) -> None:
        """Hold every Cast request until one pacing window after this client was made.

        Called on a restart: the process before this one may have spent the last window's budget
        (per account and per IP) just before it died, and its requests still count at Cast.
        """
        self.ip_limiter.pause_until(self.created + IP_WINDOW)

    def begin_stop(self) -> None:
        """No new send starts from now on (those already sent still get their answer)."""
        self.stopping = True

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, new: Config) -> None:
        """A reload: a key replaced in an entry is kept (`retired_key`) for the messages sent
        with it, and `on_key_change` hears of the entry's account."""
        old_keys, new_keys = configured_keys(self._config), configured_keys(new)
        self._config = new
        changed = []
        for entry, (old_name, old_key) in old_keys.items():
            name, key = new_keys.get(entry, ("", ""))
            if key and key != old_key:
                self._retired[default_account_name(old_key)] = (name, old_key)
                changed.append((old_name, name))
        for old_name, name in changed:
            for callback in self.on_key_change:
                callback(old_name, name)

    def account_for(self, location_id: str) -> CastAccount:
        cast = self.config.cast
        override = cast.locations.get(location_id)
        api_key, name = cast.api_key.value, cast.account
        sender_id = cast.sender_id
        if override is not None:
            if override.api_key is not None:
                api_key, name = override.api_key.value, override.account
            if override.sender_id is not None:
                sender_id = override.sender_id
        return CastAccount(api_key, sender_id, name)

    def stored_account(
        self, name: str, sender_id: str, key_id: str | None = None
    ) -> CastAccount | None:
        """The configured account called `name` sending as `sender_id`, with its current key.

        A message keeps the account of its first attempt (its idempotency scope and where its
        Cast id lives). `name` may be an account's name, the default name of one of its current
        keys (a message journaled before the account was named) or of a key a reload replaced
        (the account that key's entry now has). Failing that, the account whose current key
        has `key_id` (the account was renamed, its key kept). None if no account matches.
        """
        retired = self._retired.get(name)
        if retired is not None:
            name = retired[0]
        keys = configured_keys(self.config).values()
        for account_name, api_key in keys:
            if name in (account_name, default_account_name(api_key)):
                return CastAccount(api_key, sender_id, account_name)
        for account_name, api_key in keys:
            if key_id is not None and key_id == default_account_name(api_key):
                return CastAccount(api_key, sender_id, account_name)
        return None

    def retired_key(self, key_id: str) -> str | None:
        """The key with this `CastAccount.key_id` that a reload replaced (None if none)."""
        retired = self._retired.get(key_id)
        return retired[1] if retired is not None else None

    def account_names(self) -> dict[str, CastAccount]:
        """Every configured account by name, with its current key and default sender ID."""
        accounts = {}
        for entry, (name, api_key) in configured_keys(self.config).items():
            override = self.config.cast.locations.get(entry)
            sender_id = self.config.cast.sender_id
            if override is not None and override.sender_id is not None:
                sender_id = override.sender_id
            accounts.setdefault(name, CastAccount(api_key, sender_id, name))
        return accounts

    # -- one exchange --------------------------------------------------------------------------

    def _start(
        self, account: CastAccount, method: str, path: str, body: Any = None, **headers: str
    ) -> Coroutine[Any, Any, dict[str, Any]]:
        """Hand one request to the HTTP client now (the caller has taken the pacing slots).

        Synchronous, so the request is on its way at the instant the caller recorded its slots;
        await the result for Cast's answer.
        """
        request = HTTPRequest(
            self.base + path,
            method=method,
            headers={"X-API-Key": account.api_key, "Accept": "application/json", **headers},
            body=None if body is None else json.dumps(body),
            request_timeout=self.config.delivery.request_timeout,  # a reload applies it
        )
        if body is not None:
            request.headers["Content-Type"] = "application/json"
        started = time.monotonic()
        fetch = AsyncHTTPClient().fetch(request, raise_error=False)
        return self._answer(fetch, started, method, path)

    async def _answer(
        self, fetch: Awaitable[HTTPResponse], started: float, method: str, path: str
    ) -> dict[str, Any]:
        try:
            response = await fetch
        except (OSError, HTTPClientError) as e:
            self.metrics.upstream_answer("cast", started, None)
            raise CastError(599, _unanswered_code(e), unanswered("Cast", e)) from None
        self.metrics.upstream_answer("cast", started, response)
        if response.code == 599:
            raise CastError(
                599, _unanswered_code(response.error), unanswered("Cast", response.error)
            )
        try:
            answer = json.loads(response.body) if response.body else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise CastError(
                502 if response.code < 500 else response.code,
                "BAD_ANSWER",
                f"Cast answered {method} {path} with HTTP {response.code} and a body that is not "
                "a JSON object",
                http_status=response.code,
            )
        if 200 <= response.code < 300 and answer.get("success", True) is not False:
            return answer
        raise CastError(
            response.code if response.code >= 400 else 502,
            str(answer.get("error_code") or f"HTTP_{response.code}")[:64],
            # Cast's text may echo the number it refused, or our request's key: it reaches logs
            # and GHL without either (redacted before the cut, which would leave a piece).
            clip(str(answer.get("error") or response.reason or "error"), 500),
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            http_status=response.code,
        )

    # -- sends ---------------------------------------------------------------------------------

    async def send_once(
        self,
        account: CastAccount,
        to: str,
        message: str,
        idempotency_key: str,
        not_after: float | None = None,
        may_leave: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """One send attempt; raises `SendWindowClosed` rather than leave after `not_after`, and
        `SendWithdrawn` if `may_leave()` is false at the instant the request would leave.
        One piece: the checks after pacing and the hand-over share one lock, with no await
        between them."""
        body: dict[str, Any] = {"to": to, "message": message}
        if account.sender_id:
            body["sender_id"] = account.sender_id
        if self.stopping:
            await _park()
        entry = self._account_locks.setdefault(account.name, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:  # FIFO among this account's sends; others do not wait here
                if self.stopping:
                    await _park()
                async with _Acquired(self.concurrency) as slot:
                    # Looked up under the account lock: LimiterMap may drop an idle limiter, and
                    # one send at a time of this account uses the current one.
                    limiter = self.send_limiters.get(account.name)
                    with self.priority.send(limiter):
                        await acquire_all(limiter, self.ip_limiter)
                    if self.stopping:
                        slot.release()  # slots taken but nothing sent: harmless
                        await _park()
                    if not_after is not None and time.time() > not_after:
                        raise SendWindowClosed  # slots taken but nothing sent: harmless
                    if may_leave is not None and not may_leave():
                        raise SendWithdrawn  # as above
                    if account.name in self.paused:
                        raise AccountPaused  # slots taken but nothing sent: harmless
                    # No await from the slots' instant until the request is handed over.
                    exchange = self._start(
                        account,
                        "POST",
                        "/api/v1/sms/send",
                        body,
                        **{"X-Idempotency-Key": idempotency_key},
                    )
                    slot.keep()  # released when the answer is in, below
                    self.sends.enter()
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._account_locks.get(account.name) is entry:
                del self._account_locks[account.name]
        try:
            answer = await exchange
        except CastError as e:
            if e.status == 429:
                limiter.pause_until(time.monotonic() + (e.retry_after or 1.0))
            raise
        finally:
            self.concurrency.release()
            self.sends.leave()
        if not isinstance(answer.get("message_id"), str) or not answer["message_id"]:
            raise CastError(502, "BAD_ANSWER", "Cast accepted the message but gave no message_id")
        return answer

    # -- account -------------------------------------------------------------------------------

    async def account_info(
        self, account: CastAccount, what: str, query: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """``GET /api/v1/account/<what>`` (``balance``, ``profile``, ``usage``, ``sender-ids``,
        ``unsubscribed``) with the account's key, paced like a status poll (half of the per-IP
        budget at most, sends keep the rest); one attempt, raises `CastError`."""
        path = "/api/v1/account/" + what + ("?" + urlencode(query) if query else "")
        await acquire_all(self.poll_limiter, self.ip_limiter)
        return await self._start(account, "GET", path)

    # -- delivery status -----------------------------------------------------------------------

    def polls_paused(self, account: CastAccount) -> float:
        """Seconds until this account's status polls may go again (0: now)."""
        until = self._polls_paused.get(account.name)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._polls_paused[account.name]
            return 0.0
        return left

    async def status(self, account: CastAccount, cast_message_id: str) -> dict[str, Any]:
        """One delivery-status lookup, after any 429 pause of this account's polls."""
        path = "/api/v1/sms/status/" + quote(cast_message_id, safe="")
        pause = self.polls_paused(account)
        if pause > 0:
            await asyncio.sleep(pause)
        await self.priority.acquire(LOOKUP, self.poll_limiter)
        try:
            answer = await self._start(account, "GET", path)
        except CastError as e:
            if e.status == 429:
                until = time.monotonic() + (e.retry_after or 1.0)
                self._polls_paused[account.name] = max(
                    until, self._polls_paused.get(account.name, 0.0)
                )
            raise
        if answer.get("error_message"):
            answer["error_message"] = redact_numbers(str(answer["error_message"]))
        return answer

    # -- receipts by the page ------------------------------------------------------------------

    async def logs(
        self, account: CastAccount, first_day: str, last_day: str, limit: int, offset: int
    ) -> dict[str, Any]:
        """One page of the account's message logs (``GET /api/v1/sms/logs``, newest first), after
        the sends (castghld.priority). The entries carry message text and numbers: the caller
        reads the receipt fields and drops the rest."""
        query = urlencode({"from": first_day, "to": last_day, "limit": limit, "offset": offset})
        await self.priority.acquire(SWEEP, self.poll_limiter)
        return await self._start(account, "GET", "/api/v1/sms/logs?" + query)


async def _park() -> None:
    """Wait forever: a send that must not start waits here until its task is cancelled."""
    await asyncio.get_running_loop().create_future()


class _Acquired:
    """A semaphore slot released on leaving the block, unless `keep()` hands it on."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self.semaphore = semaphore
        self.held = False

    async def __aenter__(self) -> _Acquired:
        await self.semaphore.acquire()
        self.held = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.semaphore.release()

    def keep(self) -> None:
        self.held = False

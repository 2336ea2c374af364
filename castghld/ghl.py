"""The GHL API client: OAuth token calls and location-scoped API calls with retries.

Guarantees:
- Every request carries the `Version` header SPEC §4 names for it (none on `POST /oauth/token`:
  the OAuth spec defines none), and a short timeout.
- Calls for one location are paced under GHL's 100 requests / 10 s (`GHL_RATE_LIMIT`), and a 429
  (or `X-RateLimit-Remaining: 0`) pauses every caller of that location until GHL's window passes.
- `call()` retries 429, 5xx, timeouts and connection errors with exponential backoff and full
  jitter, never sooner than `Retry-After`, and never past its deadline. A 401 triggers one token
  refresh (itself retried within the deadline when it fails transiently) and one retry with the
  new token (`refresh_once_on_401`: the agency calls with a company token use the same rule).
  Anything else is raised as `GHLError` for the caller to map.
- Tokens, codes and client secrets never appear in a raised error or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from castghld.config import Config
from castghld.log import redact_numbers, unanswered
from castghld.metrics import Metrics
from castghld.pacing import LimiterMap, parse_interval_ms, parse_retry_after, retry_delay
from castghld.retry import RETRYABLE_STATUSES

log = logging.getLogger("castghld.ghl")

T = TypeVar("T")

VERSION = "2021-04-15"
VERSION_OAUTH = "2021-07-28"  # /oauth/locationToken, /oauth/installedLocations and /contacts/*
INSTALLED_PAGE = 100  # locations per /oauth/installedLocations page asked for (GHL may serve fewer)
INSTALLED_READS = 3  # reads of a list whose count changes while it is read
INSTALLED_MAX_PAGES = 5000  # a guard against a list that never ends
INSTALLED_CHANGED = "it changed while read"
GHL_RATE_LIMIT = (90, 10.0)  # GHL allows 100 / 10 s per location; keep a margin for clock skew


class TokenUnavailable(Exception):
    """No usable token for this location: not installed, needs reauth, or the refresh failed.

    `retryable` is true when the cause may pass (GHL's token endpoint down or rate limited, the
    state file momentarily not writable): `call()` then retries within its deadline.
    """

    def __init__(self, location_id: str, reason: str, retryable: bool = False):
        super().__init__(f"no usable GHL token for location {location_id}: {reason}")
        self.location_id = location_id
        self.reason = reason
        self.retryable = retryable


class GHLError(Exception):
    """A GHL answer other than 2xx (status 599: no answer: timeout or connection error)."""

    def __init__(
        self, status: int, message: str, *, retry_after: float | None = None, body: Any = None
    ):
        # 599 is the HTTP client's code for no answer, not one GHL sends: the message says it.
        super().__init__(message if status == 599 else f"GHL {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.body = body

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES

    @property
    def oauth_error(self) -> str:
        """The OAuth `error` code of a token endpoint answer (e.g. ``invalid_grant``), or ''."""
        return self.body.get("error", "") if isinstance(self.body, dict) else ""


class IncompleteList(GHLError):
    """GHL's list of installed locations could not be read completely. `ids`: the installed
    locations it did give (installed; about the others it says nothing)."""

    def __init__(self, message: str, ids: list[str]):
        super().__init__(502, message)
        self.ids = ids


class TokenSource(Protocol):
    async def access_token(self, location_id: str) -> str: ...
    async def refresh_after_401(self, location_id: str, rejected_token: str) -> str: ...


async def refresh_once_on_401(
    token_for: Callable[[], Awaitable[str]],
    send: Callable[[str], Awaitable[T]],
    refresh: Callable[[str], Awaitable[object]],
) -> T:
    """`send` with the token `token_for` gives; on a 401, `refresh` (given the rejected token)
    once and `send` once more with the token `token_for` gives then. A second 401 is raised.

    One use is one attempt: a caller that retries (429, 5xx) calls this again, so a 401 after a
    token passed authentication is a new one and refreshes again. A refresh that fails raises out
    of here without counting: the caller's next attempt meets the old token's 401 and refreshes.
    """
    token = await token_for()
    try:
        return await send(token)
    except GHLError as e:
        if e.status != 401:
            raise
    await refresh(token)
    return await send(await token_for())


def _retry_cause(
    error: Exception, location_id: str, retry_if: Callable[[GHLError], bool] | None
) -> tuple[Exception, str, float | None] | None:
    """For an error of `GHLClient.call` worth another attempt: what to raise once the deadline
    passes, the problem to log and GHL's Retry-After; None for a final error."""
    if isinstance(error, GHLError):
        if error.retryable or (retry_if is not None and retry_if(error)):
            return error, f"GHL {error.status}", error.retry_after
    elif isinstance(error, TokenUnavailable):
        if error.retryable:
            return error, "token unavailable", None
    elif isinstance(error, OSError):  # a refreshed pair could not be stored: it is not used
        problem = f"state not writable ({error.strerror})"
        return TokenUnavailable(location_id, problem, retryable=True), problem, None
    return None


def _message_of(body: Any, fallback: str) -> str:
    if isinstance(body, dict):
        for key in ("message", "error_description", "error", "msg"):
            value = body.get(key)
            if isinstance(value, list):
                value = "; ".join(str(v) for v in value)
            if value:
                return redact_numbers(str(value))[:500]
    return fallback


class GHLClient:
    def __init__(self, config: Config, metrics: Metrics):
        self.config = config
        self.base = config.ghl.api_base
        self.metrics = metrics
        self.limiters = LimiterMap(*GHL_RATE_LIMIT)

    # -- one exchange --------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        version: str | None = VERSION,
        token: str | None = None,
        json_body: Any = None,
        form: dict[str, str] | None = None,
        pace_key: str | None = None,
    ) -> Any:
        """One HTTP exchange with GHL; the decoded JSON answer, or GHLError. `version` None: no
        `Version` header (the OAuth token endpoint)."""
        headers = {"Accept": "application/json"}
        if version is not None:
            headers["Version"] = version
        body = None
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            body = urlencode(form)
        elif json_body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(json_body)
        limiter = self.limiters.get(pace_key) if pace_key else None
        if limiter is not None:
            await limiter.acquire()
        request = HTTPRequest(
            self.base + path,
            method=method,
            headers=headers,
            body=body,
            request_timeout=self.config.delivery.request_timeout,  # a reload applies it
        )
        started = time.monotonic()
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as e:
            self.metrics.upstream_answer("ghl", started, None)
            raise GHLError(599, unanswered("GHL", e)) from None
        self.metrics.upstream_answer("ghl", started, response)
        if limiter is not None:
            self._note_rate_limit(limiter, response)
        return self._decode(response, method, path)

    @staticmethod
    def _note_rate_limit(limiter: Any, response: HTTPResponse) -> None:
        remaining = response.headers.get("X-RateLimit-Remaining")
        interval = parse_interval_ms(response.headers.get("X-RateLimit-Interval-Milliseconds"))
        if response.code == 429:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is None:
                wait = interval
            limiter.pause_until(time.monotonic() + (wait if wait is not None else 1.0))
        elif remaining == "0" and interval is not None:
            limiter.pause_until(time.monotonic() + interval)

    @staticmethod
    def _decode(response: HTTPResponse, method: str, path: str) -> Any:
        if response.code == 599:
            raise GHLError(599, unanswered("GHL", response.error))
        try:
            body = json.loads(response.body) if response.body else {}
        except ValueError:
            body = None
        if 200 <= response.code < 300:
            if body is None:
                raise GHLError(502, f"GHL answered {method} {path} with a body that is not JSON")
            return body
        raise GHLError(
            response.code,
            _message_of(body, response.reason or "error"),
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            body=body,
        )

    # -- OAuth ---------------------------------------------------------------------------------

    def _client_form(self, **fields: str) -> dict[str, str]:
        return {
            "client_id": self.config.ghl.client_id,
            "client_secret": self.config.ghl.client_secret.value,
            **fields,
        }

    async def exchange_code(self, code: str) -> dict[str, Any]:
        return await self.request(
            "POST",
            "/oauth/token",
            version=None,
            form=self._client_form(
                grant_type="authorization_code",
                code=code,
                redirect_uri=self.config.redirect_uri,
                user_type="Location",
            ),
        )

    async def refresh_token(self, refresh_token: str, user_type: str) -> dict[str, Any]:
        return await self.request(
            "POST",
            "/oauth/token",
            version=None,
            form=self._client_form(
                grant_type="refresh_token", refresh_token=refresh_token, user_type=user_type
            ),
        )

    async def location_token(
        self, company_token: str, company_id: str, location_id: str
    ) -> dict[str, Any]:
        return await self.request(
            "POST",
            "/oauth/locationToken",
            version=VERSION_OAUTH,
            token=company_token,
            form={"companyId": company_id, "locationId": location_id},
            pace_key="company:" + company_id,  # a bulk install's mints share GHL's limit
        )

    async def installed_locations(self, company_token: str, company_id: str) -> list[str]:
        """Ids of every location of `company_id` that has our app installed, all pages.

        GHL answers ``{locations: [{_id, name, isInstalled, ...}], count, ...}``, serving pages
        of its own size (a default of 20, whatever ``limit`` asked). Pages are read, ``skip``
        moving on by what each held, until ``count`` distinct entries are seen (without
        ``count``: until an empty page). A ``count`` that changes between pages means the list
        changed under the read (its pages shifted): it is read again from the start, up to
        `INSTALLED_READS` times. An answer of another shape is a GHLError (502); a list that
        cannot be read completely (it ends short of ``count``, a page adds no new entry as from
        a server ignoring ``skip``, or it keeps changing) is an `IncompleteList` carrying what
        was read: a reconciliation never marks a location on such a list.
        """
        problem = "it kept changing while read"
        ids: list[str] = []
        for _ in range(INSTALLED_READS):
            ids, problem = await self._read_installed(company_token, company_id)
            if problem is None:
                return ids
            if problem != INSTALLED_CHANGED:
                break
        raise IncompleteList(f"GHL's list of installed locations is incomplete: {problem}", ids)

    async def _read_installed(
        self, company_token: str, company_id: str
    ) -> tuple[list[str], str | None]:
        """One read of every page: (installed ids, None), or (ids read, why it is incomplete)."""
        entries: dict[str, bool] = {}  # every entry's id -> installed, in GHL's order
        first_count: int | None = None
        for number in range(INSTALLED_MAX_PAGES):
            page, count = await self._installed_page(company_token, company_id, len(entries))
            installed = [lid for lid, on in entries.items() if on]
            if number == 0:
                first_count = count
            elif count != first_count:
                return installed, INSTALLED_CHANGED
            new = [(lid, on) for lid, on in page if lid not in entries]
            if not page:
                if count is None or len(entries) >= count:
                    return installed, None
                return installed, f"it ended after {len(entries)} of {count} entries"
            if not new:
                return installed, f"a page at skip={len(entries)} repeated entries already read"
            entries.update(new)
            if count is not None and len(entries) >= count:
                return [lid for lid, on in entries.items() if on], None
        return [lid for lid, on in entries.items() if on], "more pages than expected"

    async def _installed_page(
        self, company_token: str, company_id: str, skip: int
    ) -> tuple[list[tuple[str, bool]], int | None]:
        """One page of ``/oauth/installedLocations``: ([(id, installed)], count or None)."""
        query = urlencode(
            {
                "companyId": company_id,
                "appId": self.config.ghl.app_id,
                "isInstalled": "true",
                "skip": str(skip),
                "limit": str(INSTALLED_PAGE),
            }
        )
        answer = await self.request(
            "GET",
            "/oauth/installedLocations?" + query,
            version=VERSION_OAUTH,
            token=company_token,
            pace_key="company:" + company_id,
        )
        page = answer.get("locations") if isinstance(answer, dict) else None
        if not isinstance(page, list):
            raise GHLError(502, "GHL's installedLocations answer has no locations list")
        entries = []
        for entry in page:
            location_id = entry.get("_id") if isinstance(entry, dict) else None
            if not isinstance(location_id, str) or not location_id:
                raise GHLError(502, "GHL's installedLocations answer has an entry without _id")
            entries.append((location_id, entry.get("isInstalled", True) is not False))
        count = answer.get("count")
        valid = isinstance(count, int) and not isinstance(count, bool) and count >= 0
        return entries, count if valid else None

    # -- location-scoped calls with retries ----------------------------------------------------

    async def _checked_request(
        self, check: Callable[[Any], str | None] | None, method: str, path: str, **request: Any
    ) -> Any:
        """`request`; a 2xx answer in which `check` names a problem is a GHLError 502."""
        answer = await self.request(method, path, **request)
        problem = check(answer) if check is not None else None
        if problem is None:
            return answer
        raise GHLError(502, problem, body=answer)

    async def call(
        self,
        tokens: TokenSource,
        location_id: str,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        version: str = VERSION,
        deadline: float,
        retry_if: Callable[[GHLError], bool] | None = None,
        check: Callable[[Any], str | None] | None = None,
        context: str = "",
    ) -> Any:
        """`request` as `location_id`, with the retries of the module docstring.

        `deadline` is a `time.monotonic()` value; `retry_if` makes more errors retryable (the
        transient 403 of the status API). `check` reads a 2xx answer and names what makes it no
        success (GHL's silent drop of an inbound message), or None: such an answer is retried as
        a GHLError 502.
        """
        request = {"version": version, "json_body": json_body, "pace_key": location_id}

        def send(token: str) -> Awaitable[Any]:
            return self._checked_request(check, method, path, token=token, **request)

        async def refresh(rejected: str) -> object:
            log.info("GHL 401 location=%s %s; refreshing token once", location_id, context)
            return await tokens.refresh_after_401(location_id, rejected)

        attempt = 0
        while True:
            try:
                return await refresh_once_on_401(
                    lambda: tokens.access_token(location_id), send, refresh
                )
            except (GHLError, TokenUnavailable, OSError) as e:
                cause = _retry_cause(e, location_id, retry_if)
                if cause is None:
                    raise
                error, problem, retry_after = cause
            delay = retry_delay(attempt, retry_after, base=1.0, cap=120.0)
            if time.monotonic() + delay > deadline:
                raise error
            log.info(
                "%s location=%s %s attempt=%d; retrying in %.1fs",
                problem,
                location_id,
                context,
                attempt + 1,
                delay,
            )
            attempt += 1
            await asyncio.sleep(delay)

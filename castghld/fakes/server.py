"""The framework both fakes stand on: a Tornado server on loopback with the call log, contract
violations, scripted failures, latency, hangs and seeded random faults.

A fake is a `_FakeServer` subclass with a ``routes`` table of (method, path regex, route name,
handler method name). A handler takes the `Call` and the path's named groups and returns an
`Answer`; it calls `_violate` on a contract breach (recorded, then answered with the error status)
and `_take_failure(route)` once the contract and authentication checks passed, before any state
change (where scripted and random failures are spent). What the fakes guarantee is listed in the
package docstring (castghld/fakes/__init__.py).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import random
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote

import tornado.httpserver
import tornado.testing
import tornado.web
from tornado.httputil import HTTPHeaders, HTTPServerRequest

DROP_CONNECTION = 599
FORM = "application/x-www-form-urlencoded"


@dataclass
class Call:
    """One request as the fake received it. ``headers`` is case-insensitive."""

    method: str
    path: str
    headers: HTTPHeaders
    body: bytes
    json: Any | None
    form: dict[str, str] | None
    time: float
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Answer:
    """A response: a dict/list ``body`` is sent as JSON, bytes/str as they are, None as empty."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class _Reject(Exception):
    def __init__(self, answer: Answer):
        super().__init__(answer.status)
        self.answer = answer


@dataclass
class FaultMix:
    """Random faults of one route, drawn per request from `rng` (seed it: a failing run replays).

    `statuses`: probability of answering each status instead (599 resets the connection);
    `slow`: probability of answering `slow_seconds` late (the request takes effect, the client may
    have given up); `burst`: probability that a 429 burst starts, during which every request to the
    route gets 429 with ``Retry-After: retry_after`` for `burst_seconds`. `first`: statuses the
    route's first requests get, in order, before the draws start (so a run surely meets them).
    """

    rng: random.Random
    statuses: dict[int, float] = field(default_factory=dict)
    slow: float = 0.0
    slow_seconds: float = 0.0
    burst: float = 0.0
    burst_seconds: float = 1.0
    retry_after: str = "1"
    burst_until: float = 0.0
    first: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        total = sum(self.statuses.values()) + self.burst
        if total > 1 or self.slow > 1 or min([self.slow, self.burst, *self.statuses.values()]) < 0:
            raise ValueError("fault probabilities must be in [0, 1] and sum to at most 1")


@dataclass
class _Failure:
    answer: Answer
    times: int


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01
) -> Any:
    """Poll `predicate` until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"still false after {timeout:.1f}s: {_describe(predicate)}")
        await asyncio.sleep(interval)


def max_in_window(times: list[float], window: float) -> int:
    """The most of `times` (seconds) that fall within any `window` seconds."""
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _describe(predicate: Callable[[], Any]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


def _parse_call(request: HTTPServerRequest) -> Call:
    content_type = request.headers.get("Content-Type", "")
    body = request.body or b""
    parsed_json = parsed_form = None
    if content_type.startswith("application/json"):
        try:
            parsed_json = json.loads(body)
        except ValueError:
            parsed_json = None
    elif content_type.startswith(FORM):
        parsed_form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    method, headers, now = request.method or "", HTTPHeaders(request.headers), time.monotonic()
    query = dict(parse_qsl(request.query, keep_blank_values=True))
    return Call(method, request.path, headers, body, parsed_json, parsed_form, now, query)


def _prune(times: deque[float], window: float, now: float) -> None:
    while times and times[0] <= now - window:
        times.popleft()


class _Endpoint(tornado.web.RequestHandler):
    """Hands every request, whatever its method, to the fake and writes the `Answer`."""

    def initialize(self, fake: _FakeServer) -> None:
        self.fake = fake

    async def _serve(self, *args: str) -> None:
        answer = await self.fake._handle(self.request)
        self.set_status(answer.status)
        if answer.status == DROP_CONNECTION:  # Tornado's writes to a closed stream are no-ops
            self.request.connection.stream.close()  # type: ignore[attr-defined]
            return
        for name, value in answer.headers.items():
            self.set_header(name, value)
        if isinstance(answer.body, bytes | str):
            self.finish(answer.body)
        elif answer.body is not None:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(answer.body))

    get = post = put = patch = delete = _serve


class _FakeServer:
    """Listening, the call log, violations, and scripted failures, latency and hangs."""

    routes: tuple[tuple[str, str, str, str], ...] = ()  # (method, path regex, route, attribute)

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.latency = 0.0
        self.url = ""
        self._failures: defaultdict[str, deque[_Failure]] = defaultdict(deque)
        self._hangs: dict[str, asyncio.Event] = {}
        self._hung: Counter[str] = Counter()
        self._mixes: dict[str, FaultMix] = {}
        self.faults: Counter[tuple[str, str]] = Counter()
        self.late: list[
            Call
        ] = []  # requests answered late by a fault mix (in effect, answer lost?)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._stopping = asyncio.Event()
        self._server: tornado.httpserver.HTTPServer | None = None
        self._routes = [(m, re.compile(p), n, getattr(self, a)) for m, p, n, a in self.routes]

    async def start(self) -> None:
        self._stopping.clear()
        sock, port = tornado.testing.bind_unused_port()
        app = tornado.web.Application([(r"/.*", _Endpoint, {"fake": self})])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets([sock])
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        self._stopping.set()
        for route in list(self._hangs):
            self.release(route)
        if self._in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                pass
        await self._server.close_all_connections()
        self._server = None

    # -- scripting -----------------------------------------------------------------------------

    def fail_next(
        self,
        route: str,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` valid requests to `route` with `status` (599: drop them)."""
        if route not in {name for _, _, name, _ in self.routes}:
            raise ValueError(f"unknown route {route!r}")
        if body is None:
            body = self._error_body(status, f"scripted failure {status}")
        self._failures[route].append(_Failure(Answer(status, body, dict(headers or {})), times))

    def fault_mix(self, route: str, mix: FaultMix | None) -> None:
        """Inject `mix`'s random faults into `route` from now on (None: stop)."""
        if route not in {name for _, _, name, _ in self.routes}:
            raise ValueError(f"unknown route {route!r}")
        if mix is None:
            self._mixes.pop(route, None)
        else:
            self._mixes[route] = mix

    def hang(self, route: str) -> None:
        """Hold requests to `route` (logged in `calls`) until `release(route)` or `stop()`."""
        self._hangs.setdefault(route, asyncio.Event())

    def release(self, route: str) -> None:
        event = self._hangs.pop(route, None)
        if event is not None:
            event.set()

    def hung(self, route: str) -> int:
        """How many requests to `route` are being held right now."""
        return self._hung[route]

    def calls_to(self, method: str, path: str | re.Pattern[str]) -> list[Call]:
        """Calls with this method whose path starts with `path` (or matches it, if a regex)."""
        if isinstance(path, re.Pattern):
            return [c for c in self.calls if c.method == method and path.search(c.path)]
        return [c for c in self.calls if c.method == method and c.path.startswith(path)]

    def _error_body(self, status: int, message: str) -> Any:
        raise NotImplementedError

    # -- request pipeline ----------------------------------------------------------------------

    async def _handle(self, request: HTTPServerRequest) -> Answer:
        call = _parse_call(request)
        self.calls.append(call)
        self._in_flight += 1
        self._idle.clear()
        try:
            if self.latency > 0:
                await self._pause(self.latency)
            route, action, params = self._route(call)
            await self._hold(route)
            mix = self._mixes.get(route)
            late = mix is not None and mix.slow > 0 and mix.rng.random() < mix.slow
            try:
                answer = action(call, **params)
            except _Reject as e:
                answer = e.answer
            if late:
                self.faults[(route, "slow")] += 1
                self.late.append(call)
                await self._pause(mix.slow_seconds)
            return answer
        except _Reject as e:
            return e.answer
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _hold(self, route: str) -> None:
        event = self._hangs.get(route)
        if event is None:
            return
        self._hung[route] += 1
        try:
            await event.wait()
        finally:
            self._hung[route] -= 1

    def _route(self, call: Call) -> tuple[str, Callable[..., Answer], dict[str, str]]:
        path_known = False
        for method, pattern, route, action in self._routes:
            match = pattern.fullmatch(call.path)
            if match and method == call.method:
                # Path parameters are percent-decoded, as GHL's and Cast's servers do.
                return route, action, {k: unquote(v) for k, v in match.groupdict().items()}
            path_known = path_known or match is not None
        if path_known:
            self._violate(call, 405, "method not allowed")
        self._violate(call, 404, "unknown route")

    def _violate(
        self,
        call: Call,
        status: int,
        text: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> NoReturn:
        """Record a contract violation and answer it (body: the service's usual error body)."""
        self.violations.append(f"{call.method} {call.path}: {text}")
        answer_body = self._error_body(status, text) if body is None else body
        raise _Reject(Answer(status, answer_body, dict(headers or {})))

    def _take_failure(self, route: str) -> None:
        queue = self._failures[route]
        if not queue:
            self._take_fault(route)
            return
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.popleft()
        answer = failure.answer
        raise _Reject(Answer(answer.status, copy.deepcopy(answer.body), dict(answer.headers)))

    def _take_fault(self, route: str) -> None:
        mix = self._mixes.get(route)
        if mix is None:
            return
        now = time.monotonic()
        status, headers = None, {}
        if mix.first:
            status = mix.first.pop(0)
        elif now < mix.burst_until:
            status, headers = 429, {"Retry-After": mix.retry_after}
        else:
            draw = mix.rng.random()
            for candidate, probability in mix.statuses.items():
                if draw < probability:
                    status = candidate
                    break
                draw -= probability
            else:
                if draw < mix.burst:
                    mix.burst_until = now + mix.burst_seconds
                    status, headers = 429, {"Retry-After": mix.retry_after}
        if status is None:
            return
        self.faults[(route, str(status))] += 1
        body = self._error_body(status, f"injected fault {status}")
        raise _Reject(Answer(status, body, headers))

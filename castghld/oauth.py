"""The OAuth install URL and its signed `state` parameter.

Guarantees: a `state` made here verifies only with the same `ghl.client_secret`, only until it
expires (`STATE_LIFETIME`), and cannot be altered without detection (HMAC-SHA256). The URL carries
no secret: the state is a MAC, not the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from urllib.parse import urlencode

from castghld.config import Config
from castghld.pacing import LimiterMap, SlidingWindowLimiter, try_acquire_all

# What the install asks GHL for (README "GHL side: scopes" says what each is for). The token of an
# agency install is what mints location tokens (`POST /oauth/locationToken`: oauth.write) and
# lists the installed locations (`GET /oauth/installedLocations`: oauth.readonly); without those
# two, an agency that installs through this URL could neither mint nor reconcile.
SCOPES = (
    "conversations/message.write",
    "conversations/message.readonly",
    "conversations.write",
    "conversations.readonly",
    "contacts.readonly",
    "contacts.write",
    "oauth.write",
    "oauth.readonly",
)
STATE_LIFETIME = 15 * 60
# Code exchanges started by `GET /oauth/callback` that did not install anything, per client IP
# and in all, per minute. A person needs a few; junk codes beyond this get 429 without a call to
# GHL, so they cannot spend the GHL limits that refreshes need. Exchanges in flight count; one
# that installed gives its slot back.
EXCHANGES_PER_IP = 5
EXCHANGES_IN_ALL = 30
EXCHANGE_WINDOW = 60.0


class _Budget:
    """Exchanges per client IP and in all, in one sliding window."""

    def __init__(self, per_ip: int, in_all: int, window: float):
        self.per_ip = LimiterMap(per_ip, window)
        self.in_all = SlidingWindowLimiter(in_all, window)

    def limiters(self, ip: str) -> tuple[SlidingWindowLimiter, SlidingWindowLimiter]:
        return self.per_ip.get(ip), self.in_all


class CodeExchangeLimits:
    """How many code exchanges the callback may start: `admit(ip, state)` is 0.0 when this one
    may go (and counts it), else the seconds until one may; `installed(ip, state)` uncounts one
    that worked.

    The callback needs no credential (a marketplace install carries no `state`), so anyone can
    make it start exchanges, from any address it claims when forwarded headers are trusted
    (`server.xheaders`). Callbacks with a `state` that `verify_state` accepted come from an
    install link we issued and have a budget of their own: no amount of callbacks without one
    (the only kind junk can send without first fetching a link) makes a person's install through
    the link wait. `ip` is the address Tornado reports: the peer's, or with `server.xheaders` the
    `X-Real-IP` (else the last `X-Forwarded-For` entry) that the proxy must overwrite.
    """

    def __init__(
        self,
        per_ip: int = EXCHANGES_PER_IP,
        in_all: int = EXCHANGES_IN_ALL,
        window: float = EXCHANGE_WINDOW,
    ):
        self.without_state = _Budget(per_ip, in_all, window)
        self.with_state = _Budget(per_ip, in_all, window)

    def _limiters(
        self, ip: str, state: str | None
    ) -> tuple[SlidingWindowLimiter, SlidingWindowLimiter]:
        return (self.without_state if state is None else self.with_state).limiters(ip)

    def admit(self, ip: str, state: str | None = None) -> float:
        """`state`: a verified state of our install link, or None."""
        return try_acquire_all(*self._limiters(ip, state))

    def installed(self, ip: str, state: str | None = None) -> None:
        for limiter in self._limiters(ip, state):
            limiter.give_back()


def _state_key(config: Config) -> bytes:
    return hmac.new(
        config.ghl.client_secret.value.encode("utf-8"), b"castghld oauth state", hashlib.sha256
    ).digest()


def _mac(config: Config, payload: str) -> str:
    digest = hmac.new(_state_key(config), payload.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def make_state(config: Config, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + STATE_LIFETIME)
    payload = f"{expires}.{base64.urlsafe_b64encode(os.urandom(9)).decode('ascii')}"
    return f"{payload}.{_mac(config, payload)}"


def verify_state(config: Config, state: str, now: float | None = None) -> str | None:
    """None if `state` is authentic and fresh, else the reason it is not."""
    payload, _, mac = state.rpartition(".")
    expires, _, _ = payload.partition(".")
    try:
        valid = hmac.compare_digest(mac.encode("ascii"), _mac(config, payload).encode("ascii"))
    except (UnicodeEncodeError, ValueError):
        valid = False
    if not valid or not expires.isdigit():
        return "the install link's state parameter is invalid"
    if int(expires) < (time.time() if now is None else now):
        return "the install link has expired; start the install again"
    return None


def build_install_url(config: Config, now: float | None = None) -> str:
    query = urlencode(
        {
            "response_type": "code",
            "client_id": config.ghl.client_id,
            "redirect_uri": config.redirect_uri,
            "scope": " ".join(SCOPES),
            "state": make_state(config, now),
        }
    )
    return f"{config.ghl.auth_base}/v2/oauth/chooselocation?{query}"

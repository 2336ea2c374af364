"""Prometheus metrics of one daemon, on a registry of its own (tests run several daemons).

Guarantees: labels carry location ids, statuses and error codes only, never a token, a phone
number or a message body. Every label takes its values from a fixed set: an upstream's answer
cannot make a new time series (Cast's `error_code` is one of `CAST_ERROR_CODES` or `other`).
Every counter is exported at 0 from the start for each of its known label values (`KNOWN_LABELS`),
so `increase()`/`rate()` in an alert see the first event: a series that first appears at 1 has
increased by nothing as far as Prometheus knows.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from tornado.httpclient import HTTPResponse

from castghld import __version__

# Cast's documented error codes (SPEC §5), the only ones that become label values; any other
# `error_code` is counted as "other", so a hostile or changed upstream cannot grow the series.
CAST_ERROR_CODES = frozenset(
    {
        "VALIDATION_ERROR",
        "INVALID_REQUEST",
        "INVALID_API_KEY",
        "INSUFFICIENT_CREDITS",
        "CREDIT_LIMIT_REACHED",
        "API_KEY_REVOKED",
        "API_KEY_EXPIRED",
        "USER_INACTIVE",
        "IP_NOT_WHITELISTED",
        "CHANNEL_NOT_ALLOWED",
        "RATE_LIMIT_EXCEEDED",
        "INTERNAL_ERROR",
        "SERVICE_UNAVAILABLE",
        "PROVIDER_ERROR",
        "NOT_FOUND",
        "METHOD_NOT_ALLOWED",
    }
)


STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "no_answer")
# The label values each counter is exported with from the start (see the module docstring).
# `webhooks` outcomes: "unsigned" (no signature header: scanners, junk) is counted apart from
# "bad_signature" (a signature that does not verify: GHL's keys or ours are wrong).
KNOWN_LABELS: dict[str, list[tuple[str, ...]]] = {
    "webhooks": [
        (kind, outcome)
        for kind, outcomes in (
            ("messages", ("accepted", "duplicate", "unknown_location", "store_failed")),
            ("app", ("ok", "duplicate", "foreign_app")),
        )
        for outcome in (*outcomes, "unsigned", "bad_signature", "unusable")
    ]
    + [("signature", "legacy_rsa"), ("signature", "legacy_ecdsa")],
    "sends": [(o,) for o in ("sent", "retry", "failed", "gave_up", "rejected")],
    "statuses": [(s,) for s in ("pending", "delivered", "failed", "report_failed")],
    "token_refreshes": [(o,) for o in ("ok", "reminted", "error", "needs_reauth", "inactive")],
    "reloads": [("applied",), ("rejected",)],
    "inbound": [("received", o) for o in ("accepted", "duplicate", "unauthorized")]
    + [("attempt", o) for o in ("no_token", "failed")]
    + [
        ("delivery", o)
        for o in ("delivered", "failed", "expired", "unrouted", "invalid_number", "stuck")
    ],
    "upstream_requests": [("ghl", c) for c in STATUS_CLASSES]
    + [("cast", c) for c in STATUS_CLASSES]
    + [("cast", code) for code in sorted(CAST_ERROR_CODES)]
    + [("cast", "other")],
    "upstream_seconds": [(u, c) for u in ("ghl", "cast") for c in STATUS_CLASSES],
    "cast_outages": [(s,) for s in ("began", "ended")],
}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Gauges derived from state are computed when scraped, not on every change.
        self.before_scrape: list[Callable[[], None]] = []
        self._upstream_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        r = self.registry
        self._http_token_and_outbox_metrics(r)
        self._message_metrics(r)
        self._upstream_and_backlog_metrics(r)
        self._declare_process_and_config(r)
        for name, labelsets in KNOWN_LABELS.items():
            metric = getattr(self, name)
            for labels in labelsets:
                metric.labels(*labels)

    def _http_token_and_outbox_metrics(self, r: CollectorRegistry) -> None:
        """HTTP requests answered, installs and their tokens, GHL webhooks, the outbox, the
        accept loop."""
        self.http_requests = Counter(
            "castghld_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.installations = Gauge(
            "castghld_installations", "Installed locations by token status", ["status"], registry=r
        )
        self.token_refreshes = Counter(
            "castghld_token_refreshes", "Token refresh attempts by outcome", ["outcome"], registry=r
        )
        self.webhooks = Counter(
            "castghld_webhooks", "GHL webhooks by kind and outcome", ["kind", "outcome"], registry=r
        )
        self.outbox_pending = Gauge(
            "castghld_outbox_pending", "Unfinished messages in the outbox", ["kind"], registry=r
        )
        self.outbox_quarantined = Gauge(
            "castghld_outbox_quarantined",
            "Unreadable outbox journal records moved to outbox.quarantine at this start",
            registry=r,
        )
        self.accept_paused = Counter(
            "castghld_accept_paused",
            "Times accepting connections paused: out of file descriptors (EMFILE) or memory",
            registry=r,
        )

    def _message_metrics(self, r: CollectorRegistry) -> None:
        """What happened to messages: Cast sends, dropped ones, paused accounts, statuses
        reported to GHL, inbound messages."""
        self.sends = Counter(
            "castghld_cast_sends", "Cast send attempts by outcome", ["outcome"], registry=r
        )
        # Messages ended without being sent (stage "unsent") or without their GHL report (stage
        # "sent"): their location left (reason "location_uninstalled").
        self.outbound_dropped = Counter(
            "castghld_outbound_dropped",
            "Outbound messages ended unsent or unreported, by reason and stage",
            ["reason", "stage"],
            registry=r,
        )
        self.account_paused = Gauge(
            "castghld_cast_account_paused",
            "1 while a Cast account is paused by an account refusal (reason: its error_code)",
            ["account", "reason"],
            registry=r,
        )
        self.statuses = Counter(
            "castghld_ghl_status_reports", "Statuses reported to GHL", ["status"], registry=r
        )
        self.status_puts_saved = Counter(
            "castghld_ghl_status_puts_saved",
            "pending status PUTs not sent: the final status was known before they could leave",
            registry=r,
        )
        # One message counts once per stage: "received" (the Cast webhook), "attempt" (a try that
        # did not finish it), "delivery" (its final outcome).
        self.inbound = Counter(
            "castghld_inbound_messages",
            "Inbound messages by stage and outcome",
            ["stage", "outcome"],
            registry=r,
        )

    def _upstream_and_backlog_metrics(self, r: CollectorRegistry) -> None:
        """Requests to GHL and Cast, and the age of the oldest waiting message."""
        self.upstream_seconds = Histogram(
            "castghld_upstream_request_seconds",
            "Latency of requests to GHL and Cast by status class (2xx..5xx, no_answer)",
            ["upstream", "outcome"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "castghld_upstream_requests",
            "Requests to GHL and Cast by outcome: status class, or Cast's error_code",
            ["upstream", "outcome"],
            registry=r,
        )
        self.oldest_waiting = Gauge(
            "castghld_outbox_oldest_age_seconds",
            "Age of the oldest unfinished message in the outbox (0 when none)",
            ["kind"],
            registry=r,
        )

    def _declare_process_and_config(self, r: CollectorRegistry) -> None:
        """The metrics of the process itself: build, resources, config loads, state writes, and
        Cast outages as the send path sees them."""
        self.build_info = Gauge(
            "castghld_build_info", "castghld version and Python", ["version", "python"], registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        # Process metrics (CPU, memory, open fds, start time) as process_* and python_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.reloads = Counter(
            "castghld_config_reloads", "SIGHUP config reloads by outcome", ["outcome"], registry=r
        )
        self.state_write_seconds = Histogram(
            "castghld_state_write_seconds", "Encrypt+fsync+rename of the state file", registry=r
        )
        # As Prometheus and Alertmanager export them: 1 until a reload is rejected, 0 until one is
        # applied; the time of the config load that now runs (the start counts as one).
        self.last_reload_successful = Gauge(
            "castghld_config_last_reload_successful",
            "Whether the last config load (start or SIGHUP reload) was applied",
            registry=r,
        )
        self.last_reload_successful.set(1)
        self.last_reload_success_time = Gauge(
            "castghld_config_last_reload_success_timestamp_seconds",
            "Time of the last config load (start or SIGHUP reload) that was applied",
            registry=r,
        )
        self.last_reload_success_time.set_to_current_time()
        self.cast_outages = Counter(
            "castghld_cast_outages",
            "A Cast account's sends stopped getting answers (began) or got one again (ended)",
            ["event"],
            registry=r,
        )
        self._cast_account_metrics(r)

    def reload_done(self, applied: bool) -> None:
        """Count a SIGHUP reload and set the last-reload gauges."""
        self.reloads.labels("applied" if applied else "rejected").inc()
        self.last_reload_successful.set(1 if applied else 0)
        if applied:
            self.last_reload_success_time.set_to_current_time()

    def _cast_account_metrics(self, r: CollectorRegistry) -> None:
        """Cast accounts (castghld.credits), labelled by account name (acct-...), never a key."""
        self.parts_charged = Counter(
            "castghld_cast_parts_charged",
            "Parts Cast charged for the messages it accepted (parts of each send answer)",
            ["account"],
            registry=r,
        )
        self.credits = Gauge(
            "castghld_cast_credits",
            "Credits (parts) of the Cast account at its last balance read; negative: postpaid "
            "usage owed",
            ["account"],
            registry=r,
        )
        self.credits_read = Gauge(
            "castghld_cast_credits_read_timestamp_seconds",
            "When the account's balance was last read (epoch seconds)",
            ["account"],
            registry=r,
        )
        self.credits_needed = Gauge(
            "castghld_cast_credits_needed",
            "Parts the waiting (unsent) outbound messages of the account will use",
            ["account"],
            registry=r,
        )
        self.postpaid = Gauge(
            "castghld_cast_postpaid",
            "1 if the Cast account is billed postpaid (its profile's billing_type), else 0",
            ["account"],
            registry=r,
        )

    def upstream_answer(self, upstream: str, started: float, response: HTTPResponse | None) -> None:
        """Count one request to `upstream` ("ghl" or "cast") begun at monotonic `started`;
        `response` None (or code 599) when no answer came. Cast's refusals are counted by their
        documented `error_code` (INVALID_API_KEY, INSUFFICIENT_CREDITS, ...) so alerts can name
        them; an undocumented one as "other", one without an `error_code` by its status class."""
        code = response.code if response is not None else 599
        status_class = "no_answer" if code == 599 else f"{code // 100}xx"
        outcome = status_class
        if upstream == "cast" and code >= 400 and code != 599 and response is not None:
            outcome = _cast_error_code(response.body) or status_class
        # Children cached: this runs for every upstream request (a backlog drains at 10/s/account).
        children = self._upstream_children.get((upstream, outcome))
        if children is None:
            children = (
                self.upstream_seconds.labels(upstream, status_class),
                self.upstream_requests.labels(upstream, outcome),
            )
            self._upstream_children[(upstream, outcome)] = children
        children[0].observe(time.monotonic() - started)
        children[1].inc()


def _cast_error_code(body: bytes | None) -> str | None:
    """The label of a Cast error answer: its documented `error_code`, "other" for any other
    `error_code`, None when the body has none."""
    try:
        code = json.loads(body or b"").get("error_code")
    except (ValueError, AttributeError):
        return None
    if not code:  # absent, null or empty: not Cast's error shape
        return None
    return code if isinstance(code, str) and code in CAST_ERROR_CODES else "other"

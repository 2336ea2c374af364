"""Prometheus metrics of one daemon, on a registry of its own (tests run several daemons).

Guarantees: labels carry location ids, statuses and error codes only, never a token, a phone
number or a message body.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Gauges derived from state are computed when scraped, not on every change.
        self.before_scrape: list[Callable[[], None]] = []
        r = self.registry
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
        self.sends = Counter(
            "castghld_cast_sends", "Cast send attempts by outcome", ["outcome"], registry=r
        )
        self.statuses = Counter(
            "castghld_ghl_status_reports", "Statuses reported to GHL", ["status"], registry=r
        )
        self.inbound = Counter(
            "castghld_inbound_messages", "Inbound messages by outcome", ["outcome"], registry=r
        )
        self.upstream_seconds = Histogram(
            "castghld_upstream_request_seconds",
            "Latency of requests to GHL and Cast",
            ["upstream"],
            registry=r,
        )
        self.reloads = Counter(
            "castghld_config_reloads", "SIGHUP config reloads by outcome", ["outcome"], registry=r
        )
        self.state_write_seconds = Histogram(
            "castghld_state_write_seconds", "Encrypt+fsync+rename of the state file", registry=r
        )

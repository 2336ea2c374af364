"""What the HTTP handlers and the admin socket may use of the daemon: `Services`.

`app.Daemon` provides it; the handlers and `admin.py` see only this, so they do not import `app`
(which imports them) and a test can hand them any object with these attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from castghld.config import Config
    from castghld.credits import CastCredits
    from castghld.inflight import InFlight
    from castghld.metrics import Metrics
    from castghld.oauth import CodeExchangeLimits
    from castghld.outbound import OutboundDelivery
    from castghld.outbox import Outbox
    from castghld.signatures import SignatureVerifier
    from castghld.state import StateStore
    from castghld.tokens import Installations
    from castghld.usage import UsageLedger
    from castghld.webhook_ids import RecentWebhookIds


class Services(Protocol):
    """The admin socket uses `config`, `outbox`, `outbound` and `installations`; the HTTP
    handlers the rest.
    Attributes, not a snapshot: a reload replaces `config` and `verifier` in place."""

    config: Config
    metrics: Metrics
    phase: str  # "starting", "serving" or "stopping" (/healthz)
    started_at: float  # epoch seconds (/healthz uptime)
    requests: InFlight  # HTTP requests being answered (the graceful stop waits for them)
    route_of: dict[type, str]  # handler class -> route pattern: the metric label of a request
    verifier: SignatureVerifier  # GHL webhook signatures
    state: StateStore
    installations: Installations
    outbox: Outbox
    outbound: OutboundDelivery  # its Cast client and account states (castghld accounts)
    credits: CastCredits  # balances and the parts waiting messages need, per account
    code_exchanges: CodeExchangeLimits  # admission of OAuth callbacks
    app_webhook_ids: RecentWebhookIds  # the app-webhook dedupe
    usage: UsageLedger  # per location and day: sent, parts, outcomes, replies (castghld usage)

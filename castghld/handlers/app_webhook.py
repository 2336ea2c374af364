"""`POST /api/ghl/v1/webhook/app`: GHL's app webhooks (INSTALL, UNINSTALL; others ignored).

Guarantees: nothing is acted on unless the raw body carries a valid GHL signature (401
otherwise); a body whose `timestamp` is older than `MAX_AGE` is refused as a replay (401); a
repeated `webhookId` (GHL retries) is acknowledged without acting twice. An authentic webhook we
cannot act on is answered 200 (GHL retries every non-2xx and pauses failing endpoints).
"""

from __future__ import annotations

import datetime
import logging
import time

from castghld.ghl import GHLError
from castghld.handlers.base import APIError, APIHandler
from castghld.tokens import TokenUnavailable

log = logging.getLogger("castghld.webhook.app")

MAX_AGE = 300.0
SEEN_WEBHOOK_IDS = 10_000


def webhook_age(timestamp: object, now: float) -> float | None:
    """Seconds since an ISO 8601 `timestamp`, or None when it is absent or unreadable."""
    if not isinstance(timestamp, str) or not timestamp:
        return None
    try:
        when = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return now - when.timestamp()


class AppWebhookHandler(APIHandler):
    async def act(self, kind: object, location_id: str, company_id: str) -> str:
        installations = self.daemon.installations
        if kind == "UNINSTALL":
            removed = await installations.uninstall(location_id=location_id, company_id=company_id)
            return f"uninstalled {len(removed)} location(s)"
        if kind == "INSTALL" and location_id:
            try:
                return await installations.on_install_webhook(location_id, company_id)
            except (GHLError, TokenUnavailable) as e:
                log.error("INSTALL webhook location=%s: %s", location_id, e)
                return "install failed; see log"
        return "ignored"

    async def post(self) -> None:
        self.verify_ghl_signature("app")
        event = self.json_body()
        if not isinstance(event, dict):
            raise APIError(400, "invalid_body", "webhook body must be a JSON object")
        age = webhook_age(event.get("timestamp"), time.time())
        if age is not None and age > MAX_AGE:
            self.daemon.metrics.webhooks.labels("app", "stale").inc()
            raise APIError(401, "stale_webhook", "webhook timestamp is older than 5 minutes")
        webhook_id = event.get("webhookId")
        seen = self.daemon.seen_app_webhooks
        if isinstance(webhook_id, str) and webhook_id in seen:
            self.daemon.metrics.webhooks.labels("app", "duplicate").inc()
            return self.write_json(200, {"status": "duplicate"})
        if isinstance(webhook_id, str):
            # Marked before acting, so a copy arriving while this one awaits GHL is a duplicate.
            seen[webhook_id] = time.time()
            while len(seen) > SEEN_WEBHOOK_IDS:
                seen.popitem(last=False)
        kind = event.get("type")
        location_id = str(event.get("locationId") or "")
        company_id = str(event.get("companyId") or "")
        try:
            outcome = await self.act(kind, location_id, company_id)
        except BaseException as e:
            # Not done: GHL's retry of this webhook must be acted on, not called a duplicate.
            if isinstance(webhook_id, str):
                seen.pop(webhook_id, None)
            if isinstance(e, OSError):
                raise APIError(
                    503, "store_failed", f"cannot store the change ({e.strerror}); retry later"
                ) from None
            raise
        log.info(
            "app webhook type=%s location=%s company=%s: %s",
            kind,
            location_id or "-",
            company_id or "-",
            outcome,
        )
        self.daemon.metrics.webhooks.labels("app", "ok").inc()
        self.write_json(200, {"status": outcome})


default_handlers = [
    (r"/api/ghl/v1/webhook/app", AppWebhookHandler),
]

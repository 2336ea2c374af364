"""`POST /api/ghl/v1/webhook/app`: GHL's app webhooks (INSTALL, UNINSTALL; others ignored).

Guarantees:
- Nothing is acted on unless the raw body carries a valid GHL signature (401 otherwise).
- An authentic webhook is answered 2xx whatever its age or shape: GHL's retries keep the original
  timestamp, so an age limit would refuse every INSTALL sent while we were down. Replays are made
  harmless by the `webhookId` dedupe and by ordering (`Installations.uninstall`: an UNINSTALL
  older than the install it would delete is ignored; an INSTALL older than the last UNINSTALL
  too), which hold across restarts because the dates they compare are in the state file.
- A webhook whose ``appId`` is not ours (`ghl.app_id`) is answered 200 and ignored: GHL signs
  every app's webhooks with one key, so another app's UNINSTALL must not delete our tokens.
- A body we cannot use (not JSON, not an object, ids of the wrong type) is answered 200, counted
  (``castghld_webhooks{kind="app",outcome="unusable"}``) and logged; never a 4xx, which GHL would
  retry and count against the endpoint.
- An INSTALL that cannot be completed at once is kept durably before the 200; if it cannot be
  stored the answer is 503 so GHL retries.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from castghld.handlers.base import APIError, APIHandler, usable_id

log = logging.getLogger("castghld.webhook.app")


def webhook_time(timestamp: object) -> float | None:
    """Epoch seconds of an ISO 8601 `timestamp` (or epoch milliseconds), or None when it is
    absent, unreadable or outside (0, 1e11) s, whichever form it has (a date no event has must
    not make an UNINSTALL older than every install)."""
    if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
        seconds = timestamp / 1000.0 if timestamp > 1e11 else float(timestamp)
    elif not isinstance(timestamp, str) or not timestamp:
        return None
    else:
        try:
            when = datetime.datetime.fromisoformat(timestamp.strip().replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.timezone.utc)
            seconds = when.timestamp()
        except (ValueError, OverflowError):
            return None
    return seconds if 0 < seconds < 1e11 else None


def _id_field(event: dict[str, Any], name: str) -> str:
    """The id field `name` of an app webhook, '' if absent or unusable (`usable_id`)."""
    return usable_id(event.get(name), url_segment=False) or ""


class AppWebhookHandler(APIHandler):
    async def act(
        self,
        kind: object,
        location_id: str,
        company_id: str,
        event_at: float | None,
        webhook_id: str,
    ) -> str:
        installations = self.daemon.installations
        if kind == "UNINSTALL":
            removed = await installations.uninstall(
                location_id=location_id,
                company_id=company_id,
                event_at=event_at,
                webhook_id=webhook_id,
            )
            return f"uninstalled {len(removed)} location(s)"
        if kind == "INSTALL":
            return await installations.on_install_webhook(location_id, company_id, event_at)
        return "ignored"

    async def post(self) -> None:
        event = self.signed_json_object("app")
        if event is None:
            return
        app_id = _id_field(event, "appId")
        if "appId" in event and app_id != self.daemon.config.ghl.app_id:
            self.daemon.metrics.webhooks.labels("app", "foreign_app").inc()
            log.info(
                "app webhook for another app (appId=%s) ignored",
                app_id or "?",
                extra={"outcome": "ignored", "reason": "foreign appId"},
            )
            return self.write_json(200, {"status": "ignored", "reason": "not this app"})
        webhook_id = _id_field(event, "webhookId")
        seen = self.daemon.app_webhook_ids
        if webhook_id and webhook_id in seen:
            self.daemon.metrics.webhooks.labels("app", "duplicate").inc()
            return self.write_json(200, {"status": "duplicate"})
        kind = event.get("type")
        location_id = _id_field(event, "locationId")
        company_id = _id_field(event, "companyId")
        if kind in ("INSTALL", "UNINSTALL"):
            # A locationId we cannot read must not turn into a company-wide UNINSTALL.
            if event.get("locationId") not in (None, "") and not location_id:
                return self.ignore_unusable("app", f"{kind} with an unusable locationId")
            if not location_id and not company_id:
                return self.ignore_unusable(
                    "app", f"{kind} without a usable locationId or companyId"
                )
        if webhook_id:
            seen.mark(webhook_id)  # a copy arriving while this one awaits GHL is a duplicate
        event_at = webhook_time(event.get("timestamp"))
        try:
            outcome = await self.act(kind, location_id, company_id, event_at, webhook_id)
        except BaseException as e:
            if webhook_id:
                seen.forget(webhook_id)  # not done: GHL's retry must be acted on
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
            extra={"location_id": location_id, "outcome": outcome, "reason": str(kind)},
        )
        self.daemon.metrics.webhooks.labels("app", "ok").inc()
        self.write_json(200, {"status": outcome})


default_handlers = [
    (r"/api/ghl/v1/webhook/app", AppWebhookHandler),
]

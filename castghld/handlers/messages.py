"""`POST /api/ghl/v1/webhook/messages`: GHL's Delivery URL (``ProviderOutboundMessage``).

Guarantees:
- Nothing is recorded unless the raw body carries a valid GHL signature (401 otherwise).
- 200 means the message is durably in the outbox (or was already: a GHL retry); it will be sent
  once and its status reported. If it cannot be stored (disk full, I/O error) the answer is 503, so
  GHL retries, and nothing was kept.
- An authentic request we cannot act on is still answered 200 (SPEC §3: GHL pauses a Delivery URL
  that fails): an unknown location is logged and counted; a wrong type, an invalid number or an
  empty message is recorded and reported to GHL as ``failed`` with the reason.
- A body that is not a JSON object with the documented field types is 400: GHL never sends one,
  so it is a client bug worth a loud answer, and there is no message id to report against.
"""

from __future__ import annotations

import logging
from typing import Any

from castghld import outbound
from castghld.handlers.base import APIError, APIHandler

log = logging.getLogger("castghld.webhook.messages")

MAX_ID_CHARS = 200


def validate_outbound(body: Any) -> dict[str, Any]:
    """The webhook body if its fields have the documented types, else APIError 400."""
    if not isinstance(body, dict):
        raise APIError(400, "invalid_body", "webhook body must be a JSON object")
    for name in ("messageId", "locationId"):
        value = body.get(name)
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS:
            raise APIError(400, "invalid_field", f"{name} must be a non-empty string")
    for name in ("type", "phone", "message", "contactId"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise APIError(400, "invalid_field", f"{name} must be a string")
    attachments = body.get("attachments")
    if attachments is not None and (
        not isinstance(attachments, list) or not all(isinstance(a, str) for a in attachments)
    ):
        raise APIError(400, "invalid_field", "attachments must be a list of URL strings")
    return body


class OutboundMessageHandler(APIHandler):
    async def post(self) -> None:
        self.verify_ghl_signature("messages")
        payload = validate_outbound(self.json_body())
        metrics = self.daemon.metrics
        message_id, location_id = payload["messageId"], payload["locationId"]
        rid = outbound.record_id(message_id)
        outbox = self.daemon.outbox
        if outbox.known(rid):
            metrics.webhooks.labels("messages", "duplicate").inc()
            return self.write_json(200, {"status": "duplicate", "messageId": message_id})
        if self.daemon.installations.get(location_id) is None:
            metrics.webhooks.labels("messages", "unknown_location").inc()
            log.warning(
                "message=%s for location=%s, which has not installed the app: not sent",
                message_id,
                location_id,
            )
            return self.write_json(
                200, {"status": "ignored", "reason": f"location {location_id} is not installed"}
            )
        try:
            added = await outbox.add(rid, outbound.new_record(payload))
        except OSError as e:
            metrics.webhooks.labels("messages", "store_failed").inc()
            raise APIError(
                503, "store_failed", f"cannot store the message ({e.strerror}); retry later"
            ) from None
        metrics.webhooks.labels("messages", "accepted" if added else "duplicate").inc()
        self.write_json(
            200, {"status": "accepted" if added else "duplicate", "messageId": message_id}
        )


default_handlers = [
    (r"/api/ghl/v1/webhook/messages", OutboundMessageHandler),
]

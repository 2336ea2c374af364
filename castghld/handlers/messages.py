"""`POST /api/ghl/v1/webhook/messages`: GHL's Delivery URL (``ProviderOutboundMessage``).

Guarantees:
- Nothing is recorded unless the raw body carries a valid GHL signature (401 otherwise).
- 200 means the message is durably in the outbox (or was already: a GHL retry); it will be sent
  once and its status reported. If it cannot be stored (disk full, I/O error) the answer is 503, so
  GHL retries, and nothing was kept.
- An authentic request is never answered 4xx, whatever its shape (SPEC §3: GHL retries 4xx and
  pauses a Delivery URL that fails). An unknown location is logged and counted; a wrong type, an
  invalid number or an empty message is recorded and reported to GHL as ``failed`` with the reason.
- Shape: with a usable ``messageId`` and ``locationId`` (`usable_id`: short ASCII that fits a URL
  path segment) the message is accepted. It is sent when its text and number are usable: numbers
  for strings are read as their decimal form, attachment objects ``{url, ...}`` give their
  ``url``. Otherwise it is reported ``failed`` (``INVALID_FIELD``) naming the field. Without usable
  ids (or not JSON, not an object) nothing is stored: 200 ``ignored``, counted as
  ``castghld_webhooks{kind="messages",outcome="unusable"}`` and logged (without the values).
"""

from __future__ import annotations

import logging
from typing import Any

from castghld import outbound
from castghld.handlers.base import APIError, APIHandler, usable_id

log = logging.getLogger("castghld.webhook.messages")


def _text(value: Any) -> str | None:
    """A text field: a string, or a number in its decimal form; None if it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


_JSON_KINDS = {
    dict: "an object",
    list: "a list",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def _kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), "a string")


def outbound_payload(body: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The fields `outbound.new_record` takes, read leniently from an authentic body whose ids
    are usable, and why it cannot be sent (``(code, reason)``), or None."""
    payload: dict[str, Any] = {"messageId": body["messageId"], "locationId": body["locationId"]}
    problems = []
    for name, default in (("type", "SMS"), ("phone", ""), ("message", "")):
        value = body.get(name)
        if value is None:
            text = default
        elif name == "type":
            text = value if isinstance(value, str) else None
        else:
            text = _text(value)
        if text is None:
            problems.append(f"{name} is {_kind(value)}, not a string")
            text = default
        payload[name] = text
    attachments = body.get("attachments")
    if attachments is None:
        attachments = []
    elif isinstance(attachments, (str, dict)):
        attachments = [attachments]
    urls = []
    if not isinstance(attachments, list):
        problems.append(f"attachments is {_kind(attachments)}, not a list of URLs")
    else:
        for n, item in enumerate(attachments):
            url = item.get("url") if isinstance(item, dict) else item
            if isinstance(url, str) and url.strip():
                urls.append(url.strip())
            else:
                problems.append(f"attachments[{n}] is neither a URL nor an object with a url")
                break
    payload["attachments"] = urls
    if not problems:
        return payload, None
    return payload, ("INVALID_FIELD", "GHL sent an unusable webhook: " + "; ".join(problems))


class OutboundMessageHandler(APIHandler):
    async def post(self) -> None:
        body = self.signed_json_object("messages")
        if body is None:
            return
        message_id, location_id = (
            usable_id(body.get("messageId")),
            usable_id(body.get("locationId")),
        )
        if message_id is None or location_id is None:
            name = "messageId" if message_id is None else "locationId"
            return self.ignore_unusable("messages", f"{name} is missing or not a short ASCII id")
        self.log_fields = {"message_id": message_id, "location_id": location_id}
        payload, refused = outbound_payload(
            {**body, "messageId": message_id, "locationId": location_id}
        )
        metrics = self.daemon.metrics
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
        record = outbound.new_record(payload)
        if refused is not None:
            log.warning(
                "message=%s location=%s: %s; reported failed",
                message_id,
                location_id,
                refused[1],
                extra={"location_id": location_id, "outcome": "failed", "reason": refused[1]},
            )
            record["refused"] = refused
        try:
            added = await outbox.add(rid, record)
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

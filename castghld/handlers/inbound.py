"""`POST /api/cast/v1/webhook/inbound`: Cast tells us about a received SMS.

Guarantees: nothing is stored unless ``Authorization: Bearer <cast.inbound_secret>`` matches
(compared in constant time; 401 otherwise). A body without the documented string fields is 400
with the field named. 200 means the message is durably in the outbox (or already was: the same
``message_id`` twice is one message); 503 means it could not be stored and Cast should retry.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from castghld import inbound
from castghld.handlers.base import APIError, APIHandler, usable_id

log = logging.getLogger("castghld.webhook.inbound")

MAX_FIELD_CHARS = {"message_id": 200, "from": 64, "to": 64, "message": 20_000, "received_at": 64}


def validate_inbound(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "invalid_body", "body must be a JSON object")
    for name, limit in MAX_FIELD_CHARS.items():
        value = body.get(name)
        if name == "received_at" and value is None:
            continue
        if not isinstance(value, str) or (name != "message" and not value.strip()):
            raise APIError(400, "invalid_field", f"{name} must be a non-empty string")
        if len(value) > limit:
            raise APIError(400, "invalid_field", f"{name} is longer than {limit} characters")
    return body


class InboundHandler(APIHandler):
    def check_secret(self) -> None:
        expected = self.daemon.config.cast.inbound_secret.value
        given = self.request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = (
            bool(expected)
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), expected.encode())
        )
        if not ok:
            self.daemon.metrics.inbound.labels("received", "unauthorized").inc()
            # Worded so that the log's secret scrubber finds no header value in it to hide.
            raise APIError(
                401,
                "unauthorized",
                "missing or wrong Authorization header: it must hold cast.inbound_secret "
                "(scheme Bearer)",
            )

    async def post(self) -> None:
        self.check_secret()
        payload = validate_inbound(self.json_body())
        cast_id = usable_id(payload["message_id"])
        if cast_id is not None:
            self.log_fields = {"cast_id": cast_id}
        try:
            added = await self.daemon.outbox.add(
                inbound.record_id(payload["message_id"]),
                # The single-location rule is decided now, from who is installed now.
                inbound.new_record(payload, inbound.sole_location(self.daemon.installations)),
            )
        except OSError as e:
            raise APIError(
                503, "store_failed", f"cannot store the message ({e.strerror}); retry later"
            ) from None
        self.daemon.metrics.inbound.labels("received", "accepted" if added else "duplicate").inc()
        self.write_json(200, {"status": "accepted" if added else "duplicate"})


default_handlers = [
    (r"/api/cast/v1/webhook/inbound", InboundHandler),
]

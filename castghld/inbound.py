"""Inbound SMS: a reply Cast received, from the outbox to the right location's GHL conversation.

Routing: the Cast ``to`` (our number in any PH form, or a sender ID) selects the location through
``cast.locations.<id>.inbound_numbers``; when nothing maps it and exactly one location is
installed, that one. A message no location claims stays in the outbox (logged, counted in
``castghld_outbox_pending{kind="inbound"}``) and is routed again at the next start, so a mapping
added to the config later still delivers it.

Delivery: ``from`` normalised to E.164, ``POST /contacts/upsert`` (the contact id is cached per
location + phone, so a known number costs no upsert), then ``POST /conversations/messages/inbound``.
GHL 429/5xx/timeouts are retried with backoff, a 401 refreshes the token once (``GHLClient.call``).

Duplicates: GHL's inbound API has no idempotency key. The one window that can duplicate a message
is a crash (or kill -9) after GHL accepted the POST and before the ``done`` entry is fsynced in
the outbox journal: the restart posts it again. Nothing else is awaited in that window: the
``done`` entry is queued in the same IOLoop step in which GHL's answer arrives.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from castghld.config import Config
from castghld.ghl import VERSION_OAUTH, GHLClient, GHLError
from castghld.metrics import Metrics
from castghld.outbox import Outbox, Record
from castghld.phone import normalize_any
from castghld.tokens import Installations, TokenUnavailable

log = logging.getLogger("castghld.inbound")

KIND = "inbound"
CONTACT_CACHE_SIZE = 50_000


def record_id(cast_message_id: str) -> str:
    return "in:" + cast_message_id


def new_record(payload: dict[str, Any]) -> Record:
    return {
        "kind": KIND,
        "cast_id": payload["message_id"],
        "from": payload["from"],
        "to": payload["to"],
        "message": payload["message"],
        "received_at": payload.get("received_at")
        or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "accepted_at": time.time(),
    }


def number_key(value: str) -> str:
    """How a `to` value is matched: E.164 for numbers, case-folded text for sender IDs."""
    return normalize_any(value) or value.strip().casefold()


class InboundDelivery:
    def __init__(
        self, config: Config, ghl: GHLClient, installations: Installations, metrics: Metrics
    ):
        self.config = config
        self.ghl = ghl
        self.installations = installations
        self.metrics = metrics
        self.routes: dict[str, str] = {}
        for location_id, override in config.cast.locations.items():
            for number in override.inbound_numbers:
                self.routes[number_key(number)] = location_id
        self.contacts: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()

    def route(self, to: str) -> str | None:
        location_id = self.routes.get(number_key(to))
        if location_id is not None:
            return location_id
        installed = self.installations.location_ids()
        return installed[0] if len(installed) == 1 else None

    async def __call__(self, outbox: Outbox, rid: str) -> None:
        record = outbox.records[rid]
        location_id = self.route(record["to"])
        context = f"inbound={record['cast_id']} to={record['to']}"
        if location_id is None:
            self.metrics.inbound.labels("unrouted").inc()
            log.warning(
                "%s: no location claims this number (set cast.locations.<id>.inbound_numbers); "
                "kept in the outbox and routed again at the next start",
                context,
            )
            return
        context += f" location={location_id}"
        phone = normalize_any(record["from"])
        if phone is None:
            self.metrics.inbound.labels("invalid_number").inc()
            log.error("%s: the sender is not a valid phone number; dropped", context)
            await outbox.finish(rid)
            return
        deadline = time.monotonic() + self.config.delivery.report_deadline
        try:
            contact_id = await self._contact(location_id, phone, deadline, context)
            body: dict[str, Any] = {
                "type": "SMS",
                "contactId": contact_id,
                "message": record["message"],
                "altId": record["cast_id"],
                "date": record["received_at"],
            }
            if self.config.ghl.conversation_provider_id:
                body["conversationProviderId"] = self.config.ghl.conversation_provider_id
            await self.ghl.call(
                self.installations,
                location_id,
                "POST",
                "/conversations/messages/inbound",
                json_body=body,
                deadline=deadline,
                context=context,
            )
        except (GHLError, TokenUnavailable) as e:
            self.metrics.inbound.labels("failed").inc()
            log.error("%s: GHL did not take the message: %s", context, e)
            await outbox.finish(rid)
            return
        # The duplicate window of the module docstring starts here: no await before the append.
        await outbox.finish(rid)
        self.metrics.inbound.labels("delivered").inc()
        log.info("%s: delivered to GHL", context)

    async def _contact(self, location_id: str, phone: str, deadline: float, context: str) -> str:
        key = (location_id, phone)
        contact_id = self.contacts.get(key)
        if contact_id is not None:
            self.contacts.move_to_end(key)
            return contact_id
        answer = await self.ghl.call(
            self.installations,
            location_id,
            "POST",
            "/contacts/upsert",
            json_body={"locationId": location_id, "phone": phone},
            version=VERSION_OAUTH,
            deadline=deadline,
            context=context,
        )
        contact = answer.get("contact") if isinstance(answer, dict) else None
        contact_id = contact.get("id") if isinstance(contact, dict) else None
        if not isinstance(contact_id, str) or not contact_id:
            raise GHLError(502, "GHL's contact upsert answer has no contact id")
        self.contacts[key] = contact_id
        while len(self.contacts) > CONTACT_CACHE_SIZE:
            self.contacts.popitem(last=False)
        return contact_id

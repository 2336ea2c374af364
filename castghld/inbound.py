"""Inbound SMS: a reply Cast received, from the outbox to the right location's GHL conversation.

Routing: the Cast ``to`` (our number in any PH form, or a sender ID) selects the location through
``cast.locations.<id>.inbound_numbers``. When nothing maps it, the single-location rule
(`sole_location`, decided once, when the reply is accepted, and kept in its record) may give it
a location: the one installed location, if exactly one was installed when the reply was
accepted and no other location had left (UNINSTALL or ``forget`` within 30 days, or marked
uninstalled); with none installed and none left, the first location installed while it is the
only one. Otherwise no location is guessed: a reply that arrived while two locations were
installed, or after another one left, is never given to the one that remains, whose business
would see another's customer. A message no location claims, or whose location is not (or no
longer) installed, stays in the outbox (logged, counted in
``castghld_outbox_pending{kind="inbound"}`` and ``castghld_inbound_messages_total{stage=
"delivery", outcome="unrouted"}``): it is tried again when a location is installed and at every
start, so a mapping added to the config later still delivers it.

Delivery: ``from`` normalised to E.164, ``POST /contacts/upsert`` (the contact id is cached per
location + phone, so a known number costs no upsert), then ``POST /conversations/messages/inbound``
(with ``conversationProviderId`` when ``ghl.conversation_provider_id`` is set). A 401 refreshes the
token once (``GHLClient.call``).

Nothing Cast was told we accepted is dropped because GHL failed: 429, 5xx, timeouts, a token that
cannot be had for now, and a 2xx answer without ``messageId`` or ``success: true`` (GHL drops a
message that way, e.g. without the ``conversationProviderId`` of a Custom provider; logged at
warning and counted as ``failed``, never ``delivered``) are retried with capped exponential
backoff (at most 120 s apart, ``GHLClient.call``) until the reply is ``delivery.inbound_max_age``
old (default 7 d). After that it is logged at error with its id and kept in the outbox
(``castghld outbox``), tried again at the next start. Only a permanent 4xx from GHL ends it,
logged with GHL's reason.
A reply that no location claims (or whose location is not installed) waits for an install; one
still waiting when it is ``delivery.inbound_max_age`` old is logged at error and dropped when it
is next routed (at an install or a start).

Duplicates: GHL's inbound API has no idempotency key, so a POST that GHL stored but whose answer
we did not get is posted again. That happens in exactly two cases:
- a crash (kill -9, power loss) after GHL stored the POST and before our ``done`` entry is fsynced
  in the outbox journal; nothing else is awaited in that window (the entry is queued in the same
  IOLoop step in which GHL's answer arrives), so it is one fsync long;
- GHL's answer is lost (timeout, connection reset, a 5xx from its edge after the message was
  stored): we cannot tell that from a POST that never arrived, and retrying is the only way not
  to lose the reply.
A graceful stop does not add a case: it lets inbound POSTs in flight finish (bounded) first.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

from castghld.config import Config
from castghld.ghl import VERSION_OAUTH, GHLClient, GHLError, TokenUnavailable
from castghld.inflight import InFlight
from castghld.log import redact_numbers
from castghld.metrics import Metrics
from castghld.outbox import Outbox, Record
from castghld.phone import normalize_any, route_key
from castghld.tokens import Installations

log = logging.getLogger("castghld.inbound")

KIND = "inbound"
CONTACT_CACHE_SIZE = 50_000


def record_id(cast_message_id: str) -> str:
    return "in:" + cast_message_id


# `sole_location` of a reply accepted while no location was installed and none had left.
FIRST_INSTALLED = "*"


def sole_location(installations: Installations) -> str:
    """Where the single-location rule sends a reply accepted now (see the module docstring):
    the only installed location, `FIRST_INSTALLED`, or "" (no location is guessed)."""
    installed = installations.location_ids()
    if len(installed) > 1 or installations.departed() - set(installed):
        return ""
    return installed[0] if installed else FIRST_INSTALLED


def new_record(payload: dict[str, Any], sole: str = "") -> Record:
    """`sole`: `sole_location` when the reply was accepted."""
    return {
        "kind": KIND,
        "cast_id": payload["message_id"],
        "from": payload["from"],
        "to": payload["to"],
        "message": payload["message"],
        "received_at": received_at(payload.get("received_at")),
        "accepted_at": time.time(),
        "sole_location": sole,
    }


# Cast is a Philippine service: a timestamp without an offset is read as Manila time.
MANILA = datetime.timezone(datetime.timedelta(hours=8))


def received_at(value: str | None) -> str:
    """`value` as ISO 8601 UTC (``2026-11-26T01:00:00Z``); now, if it is missing or unreadable,
    rather than a date GHL would refuse (which would drop the reply)."""
    utc = None
    if value:
        try:
            when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=MANILA)
            # Dates at the calendar's edges (0001-01-01 in Manila, 9999-12-31 west of UTC)
            # have no UTC form: OverflowError.
            utc = when.astimezone(datetime.timezone.utc)
        except (ValueError, OverflowError):
            log.warning(
                "inbound received_at %r is not a representable ISO 8601 date; using the time we "
                "got it",
                value[:64],
            )
    if utc is None:
        utc = datetime.datetime.now(datetime.timezone.utc)
    return utc.isoformat(timespec="seconds").replace("+00:00", "Z")


def inbound_routes(config: Config) -> dict[str, str]:
    """Our numbers (`cast.locations.*.inbound_numbers`, normalised) -> the location they serve."""
    routes: dict[str, str] = {}
    for location_id, override in config.cast.locations.items():
        for number in override.inbound_numbers:
            routes[route_key(number)] = location_id
    return routes


class InboundDelivery:
    def __init__(
        self, config: Config, ghl: GHLClient, installations: Installations, metrics: Metrics
    ):
        self.config = config
        self.ghl = ghl
        self.installations = installations
        self.metrics = metrics
        self.routes = inbound_routes(config)
        self.contacts: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self.stopping = False
        self.posts = InFlight()  # GHL inbound posts whose answer is not in yet
        # Counts each reply delivered to GHL: (location id) -> None (app.init_delivery sets it).
        self.count_reply: Callable[[str], None] = lambda _location_id: None

    def begin_stop(self) -> None:
        """No new POST to GHL starts from now on (the outbox keeps the records)."""
        self.stopping = True

    def route(self, record: Record) -> str | None:
        """The location of a reply: its ``to`` mapped by ``inbound_numbers``, else the
        single-location rule as decided at its acceptance (a record written before that rule
        existed has none)."""
        location_id = self.routes.get(route_key(record["to"]))
        if location_id is not None:
            return location_id
        sole = record.get("sole_location") or None
        if sole != FIRST_INSTALLED:
            return sole
        installed = self.installations.location_ids()
        if len(installed) == 1 and not self.installations.departed() - set(installed):
            return installed[0]
        return None

    def _expired(self, record: Record) -> bool:
        return (
            time.time() - record.get("accepted_at", time.time())
            > self.config.delivery.inbound_max_age
        )

    async def _expire(
        self, outbox: Outbox, rid: str, context: str, why: str, ids: dict[str, str]
    ) -> None:
        self.metrics.inbound.labels("delivery", "expired").inc()
        log.error(
            "%s: %s for longer than delivery.inbound_max_age (%.0fh); dropped",
            context,
            why,
            self.config.delivery.inbound_max_age / 3600,
            extra={**ids, "outcome": "expired", "reason": why},
        )
        await outbox.finish(rid)

    async def __call__(self, outbox: Outbox, rid: str) -> None:
        """Deliver one reply to GHL (the outbox's `Pipeline` for inbound records). Kept whole: it
        reads as the reply's outcomes in order, each with its metric and log line."""
        record = outbox.records[rid]
        location_id = self.route(record)
        # The operator's own number is a phone number like any other: never in full in a log.
        context = f"inbound={record['cast_id']} to={redact_numbers(record['to'])}"
        # The same ids as fields of every JSON line about this reply.
        ids = {"cast_id": record["cast_id"]}
        if location_id is None:
            if self._expired(record):
                return await self._expire(outbox, rid, context, "no location claimed it", ids)
            self.metrics.inbound.labels("delivery", "unrouted").inc()
            log.warning(
                "%s: no location claims this number (set cast.locations.<id>.inbound_numbers); "
                "kept in the outbox and routed again on the next install or start",
                context,
                extra={**ids, "outcome": "unrouted"},
            )
            return
        context += f" location={location_id}"
        ids["location_id"] = location_id
        phone = normalize_any(record["from"])
        if phone is None:
            self.metrics.inbound.labels("delivery", "invalid_number").inc()
            log.error(
                "%s: the sender is not a valid phone number; dropped",
                context,
                extra={**ids, "outcome": "invalid_number"},
            )
            await outbox.finish(rid)
            return
        age = time.time() - record.get("accepted_at", time.time())
        deadline = time.monotonic() + max(0.0, self.config.delivery.inbound_max_age - age)
        try:
            await self._deliver(record, location_id, phone, deadline, context)
        except TokenUnavailable as e:
            if e.retryable:
                return self._give_up_for_now(context, str(e), ids)
            if self._expired(record):
                why = "its location was not installed"
                return await self._expire(outbox, rid, context, why, ids)
            # Not installed (any more), or needs reauthorisation: keep it for a (re)install.
            self.metrics.inbound.labels("attempt", "no_token").inc()
            log.warning(
                "%s: kept in the outbox until the location is installed: %s",
                context,
                e,
                extra={**ids, "outcome": "no_token"},
            )
            return
        except GHLError as e:
            if e.retryable:
                return self._give_up_for_now(context, f"GHL {e.status} {e.message}", ids)
            self.metrics.inbound.labels("delivery", "failed").inc()
            log.error(
                "%s: GHL refused the message (%d %s); dropped",
                context,
                e.status,
                e.message,
                extra={**ids, "outcome": "failed", "reason": e.message},
            )
            await outbox.finish(rid)
            return
        # The duplicate window of the module docstring starts here: no await before the append.
        await outbox.finish(rid)
        self.count_reply(location_id)
        self.metrics.inbound.labels("delivery", "delivered").inc()
        log.info(
            "%s: delivered to GHL",
            context,
            extra={**ids, "outcome": "delivered"},
        )

    def _give_up_for_now(self, context: str, why: str, ids: dict[str, str]) -> None:
        """Retried for delivery.inbound_max_age without success: kept, tried again at a start."""
        self.metrics.inbound.labels("delivery", "stuck").inc()
        log.error(
            "%s: GHL has not taken this reply for delivery.inbound_max_age (%.0fh), last: %s; "
            "kept in the outbox (castghld outbox) and tried again at the next start",
            context,
            self.config.delivery.inbound_max_age / 3600,
            why,
            extra={**ids, "outcome": "stuck", "reason": why},
        )

    async def _deliver(
        self, record: Record, location_id: str, phone: str, deadline: float, context: str
    ) -> None:
        """Upsert the contact (or use the cached id) and post the message; a cached contact that
        GHL no longer knows (deleted, merged) is upserted again once."""
        cached = (location_id, phone) in self.contacts
        contact_id = await self._contact(location_id, phone, deadline, context)
        try:
            await self._post(record, location_id, contact_id, deadline, context)
        except GHLError as e:
            if not cached or e.status not in (400, 404, 422):
                raise
            log.info("%s: GHL refused the cached contact (%d); upserting again", context, e.status)
            self.contacts.pop((location_id, phone), None)
            contact_id = await self._contact(location_id, phone, deadline, context)
            await self._post(record, location_id, contact_id, deadline, context)

    async def _post(
        self, record: Record, location_id: str, contact_id: str, deadline: float, context: str
    ) -> None:
        if self.stopping:  # park: the outbox cancels this task and keeps the record
            await asyncio.get_running_loop().create_future()
        body: dict[str, Any] = {
            "type": "SMS",
            "contactId": contact_id,
            "message": record["message"],
            "altId": record["cast_id"],
            "date": record["received_at"],
        }
        if self.config.ghl.conversation_provider_id:
            body["conversationProviderId"] = self.config.ghl.conversation_provider_id

        def dropped(answer: Any) -> str | None:
            if isinstance(answer, dict) and (
                answer.get("messageId") or answer.get("success") is True
            ):
                return None
            self.metrics.inbound.labels("attempt", "failed").inc()
            cause = (
                "is ghl.conversation_provider_id the app's Custom conversation provider?"
                if self.config.ghl.conversation_provider_id
                else "a Custom conversation provider needs ghl.conversation_provider_id"
            )
            log.warning(
                "%s: GHL answered 2xx without messageId or success:true: the message was not "
                "stored (%s); retrying",
                context,
                cause,
                extra={
                    "cast_id": record["cast_id"],
                    "location_id": location_id,
                    "outcome": "failed",
                    "reason": "ghl_dropped",
                },
            )
            return "GHL answered 2xx without messageId (message dropped)"

        with self.posts:
            await self.ghl.call(
                self.installations,
                location_id,
                "POST",
                "/conversations/messages/inbound",
                json_body=body,
                deadline=deadline,
                check=dropped,
                context=context,
            )

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

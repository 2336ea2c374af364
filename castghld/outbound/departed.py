"""The messages of a location that left (see "A location that left" in the package docstring):
dropped unsent or finished unreported, in one journal write, and every step checks the location
before it runs.
"""

from __future__ import annotations

import logging
from typing import Any

from castghld.outbox import Outbox
from castghld.records import KIND, Stage
from castghld.scheduler import StepRun, StepScheduler
from castghld.tokens import Installations

# One logger for all of outbound delivery: operators filter on it.
log = logging.getLogger("castghld.outbound")

# Why the messages of a location that left end unsent or unreported (metric and log reason).
DEPARTED = "location_uninstalled"


class DepartedLocations:
    """The departed-location handling of `OutboundDelivery`, its base: these methods use its
    outbox, installations, scheduler, drop counters and `finish`."""

    outbox: Outbox | None
    installations: Installations
    scheduler: StepScheduler
    _dropped: dict[str, Any]

    def _installed(self, location_id: str) -> bool:
        return self.installations.get(location_id) is not None

    def _unless_departed(self, run: StepRun) -> StepRun:
        """`run`, unless the record's location left: then the message ends (`end_departed`)."""

        async def step(rid: str) -> None:
            assert self.outbox is not None
            if not self._installed(self.outbox.records[rid]["location_id"]):
                await self.end_departed(rid)
                return
            await run(rid)

        return step

    async def end_departed(self, rid: str) -> None:
        """End a message whose location left: unsent, it is dropped; sent, it is finished
        without its GHL report (there is no token to make it with)."""
        assert self.outbox is not None
        record = self.outbox.records.get(rid)
        if record is None:
            self.scheduler.release(rid)
            return
        unsent = record["stage"] == Stage.NEW
        self._dropped["unsent" if unsent else "sent"].inc()
        await self.finish(rid, "dropped" if unsent else "unreported", DEPARTED)

    def location_departed(self, location_id: str) -> None:
        """`Installations.on_departed`: end the location's messages (`_drop_location`)."""
        if self.outbox is not None and not self.scheduler.stopping:
            self.scheduler.spawn(self._drop_location(location_id))

    async def _drop_location(self, location_id: str) -> None:
        """End every message of a location that left, in one journal write: those waiting to
        be sent are dropped, those sent are finished without their GHL report; one log line.
        A message whose step runs right now is left to it: the send asks at the instant its
        request would leave (``may_leave``), and the step after it ends the message."""
        assert self.outbox is not None
        if self._installed(location_id):  # installed again meanwhile
            return
        unsent, sent, busy = [], [], 0
        for rid in self.outbox.ids_of_location(location_id):
            record = self.outbox.records[rid]
            if record.get("kind") != KIND:
                continue
            if self.scheduler.running(rid):
                busy += 1
            else:
                (unsent if record["stage"] == Stage.NEW else sent).append(rid)
        if not (unsent or sent or busy):
            return
        log.warning(
            "location=%s left (%s): %d unsent message(s) dropped, %d sent one(s) finished "
            "without their GHL report, %d in progress end with their current step",
            location_id,
            DEPARTED,
            len(unsent),
            len(sent),
            busy,
            extra={
                "location_id": location_id,
                "outcome": "dropped",
                "reason": DEPARTED,
                "count": len(unsent) + len(sent),
            },
        )
        self._dropped["unsent"].inc(len(unsent))
        self._dropped["sent"].inc(len(sent))
        await self.outbox.finish_many(unsent + sent)
        for rid in unsent + sent:
            self.scheduler.release(rid)

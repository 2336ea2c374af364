"""The store of install records: their sections and statuses, lookups, and the commit that makes
a token pair durable.

The token store is the most precious state the daemon has: losing a refresh token means the
customer must reinstall. Guarantees:

- A token pair GHL hands us (code exchange, refresh, location token) is `put` into the state store
  and committed (fsynced) with no other await in between; nothing uses a new access token before
  that commit has returned (`InstallStore.durable`). The one window in which a crash loses a pair
  is unavoidable: between GHL's answer arriving and the fsync of the file that holds it. After
  that, the pair survives.
- An install (code exchange or mint) whose commit fails is rolled back in memory, so a caller told
  "not saved" (503) is telling the truth: it is not installed later when the disk recovers. A
  refreshed pair whose commit fails stays in memory (GHL already spent the old refresh token) and
  is not used until a later commit succeeds.

Records (JSON, in state sections): ``installs`` by location id: ``access_token, refresh_token,
expires_at (epoch s), status, company_id, scope, installed_at, refreshed_at, source`` (``direct``,
``agency`` or ``reconciled``); ``companies`` by company id (+ ``approved_locations``);
``pending_installs`` by location id: ``company_id, event_at, received_at``; ``uninstalls`` by
location id: ``at`` (the last UNINSTALL's date, for ordering; kept `TOMBSTONE_AGE`);
``undated_uninstalls`` by webhookId: ``at`` (first delivery of an UNINSTALL without timestamp);
``forgotten`` by location id: ``at`` (``castghld forget``: not minted again by a reconciliation
until a new INSTALL or an OAuth install); ``unlisted`` by location id: ``at`` (first complete read
of GHL's list that lacked it, `unlisted.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from castghld.config import Config
from castghld.ghl import GHLError
from castghld.metrics import Metrics
from castghld.periodic import PeriodicWaits
from castghld.state import StateStore

# Every module of the package logs as castghld.tokens: one name to filter on, as before the split.
log = logging.getLogger("castghld.tokens")

INSTALLS = "installs"
COMPANIES = "companies"
PENDING = "pending_installs"
UNINSTALLS = "uninstalls"
UNDATED_UNINSTALLS = "undated_uninstalls"  # webhookId -> first delivery of a dateless UNINSTALL
FORGOTTEN = "forgotten"  # location id -> when `castghld forget` deleted it
UNLISTED = "unlisted"  # location id -> first complete read of GHL's list that lacked it
# location id -> the date of GHL's last INSTALL webhook for it while we held it installed (a
# reinstall whose UNINSTALL is late or lost): an UNINSTALL or a list older than it does not count.
INSTALL_EVENTS = "install_events"
STATUS_OK = "ok"
STATUS_NEEDS_REAUTH = "needs_reauth"
STATUS_INACTIVE = "inactive"
STATUS_UNINSTALLED = "uninstalled"  # GHL no longer lists it (reconciliation): not texted for
SOURCE_DIRECT = "direct"
SOURCE_AGENCY = "agency"
SOURCE_RECONCILED = "reconciled"
MAX_EXPIRES_IN = 90 * 86400.0  # far beyond GHL's ~1 day: anything longer is a bad answer


def pair_from_answer(answer: dict[str, Any], now: float) -> dict[str, Any]:
    """The record fields of a token answer from GHL (GHLError 502 if it has no usable pair)."""
    try:
        access, refresh = answer["access_token"], answer["refresh_token"]
        expires_in = float(answer.get("expires_in") or 86399)
    except (KeyError, TypeError, ValueError):
        raise GHLError(502, "GHL's token answer lacks access_token/refresh_token") from None
    if not isinstance(access, str) or not isinstance(refresh, str) or not access or not refresh:
        raise GHLError(502, "GHL's token answer has empty tokens")
    if not 0 < expires_in <= MAX_EXPIRES_IN:  # NaN, inf, negative: never refreshed, or always
        log.warning("GHL's token answer has expires_in=%r; taking %d s", expires_in, 86399)
        expires_in = 86399.0
    return {
        "access_token": access,
        "refresh_token": refresh,
        "expires_at": now + expires_in,
        "scope": answer.get("scope", ""),
        "status": STATUS_OK,
        "refreshed_at": now,
    }


def usable(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("status", STATUS_OK) == STATUS_OK


class InstallStore:
    """The install records in the state store. One instance is shared by every part of
    `Installations`; its `config` is the one a reload replaces (`Installations.config`)."""

    def __init__(self, config: Config, state: StateStore, metrics: Metrics):
        self.config = config
        self.state = state
        self.metrics = metrics
        self.periods = PeriodicWaits()  # the sweep and reconciliation loops wait on it
        # Called with a location id once its pair is on disk and usable (install, reinstall,
        # recovery from inactive): work that waited for the location can go on.
        self.on_usable: list[Callable[[str], None]] = []
        # Called with a location id once its departure is durable (UNINSTALL, forget, confirmed
        # unlisted by a reconciliation): nothing more is sent or reported for it.
        self.on_departed: list[Callable[[str], None]] = []
        # When GHL's INSTALL webhook last arrived for a location we hold as installed (by
        # location id): GHL installed it then, so a list asked for before that cannot show it
        # gone (`installed_since`). In memory: the reconciliation it races runs in this process.
        self.install_heard: dict[str, float] = {}

    # -- lookups -------------------------------------------------------------------------------

    def get(self, location_id: str) -> dict[str, Any] | None:
        """The location's record, or None if it is not installed (a location GHL no longer lists
        counts as not installed: nothing is sent or delivered for it)."""
        record = self.state.get(INSTALLS, location_id)
        if record is None or record.get("status") == STATUS_UNINSTALLED:
            return None
        return record

    def install_date(self, location_id: str, record: dict[str, Any]) -> float:
        """The date of the location's install, what an UNINSTALL is ordered against: its
        ``installed_at``, or the date of a later INSTALL webhook for it (`INSTALL_EVENTS`)."""
        event = self.state.get(INSTALL_EVENTS, location_id) or {}
        return max(record.get("installed_at", 0.0), event.get("at", 0.0))

    def installed_since(self, location_id: str, record: dict[str, Any]) -> float:
        """When GHL last said the location is installed, what a list of installed locations is
        ordered against: `install_date`, or the arrival of a later INSTALL webhook for it
        (`install_heard`)."""
        return max(self.install_date(location_id, record), self.install_heard.get(location_id, 0.0))

    def location_ids(self) -> list[str]:
        return [
            location_id
            for location_id, record in self.state.items(INSTALLS)
            if record.get("status") != STATUS_UNINSTALLED
        ]

    def departed(self) -> set[str]:
        """Locations that left and are remembered: an UNINSTALL or `forget` within
        `TOMBSTONE_AGE` (its tombstone), or marked uninstalled by reconciliation."""
        left = {location_id for location_id, _ in self.state.items(UNINSTALLS)}
        left.update(
            location_id
            for location_id, record in self.state.items(INSTALLS)
            if record.get("status") == STATUS_UNINSTALLED
        )
        return left

    def departure_durable(self, location_ids: list[str]) -> None:
        """Tell `on_departed` about `location_ids`, whose departure was just committed."""
        for location_id in location_ids:
            for callback in self.on_departed:
                callback(location_id)

    def pending(self) -> list[str]:
        """Location ids of INSTALL webhooks not completed yet."""
        return [location_id for location_id, _ in self.state.items(PENDING)]

    def update_metrics(self) -> None:
        """Set the installation gauges (run on each /metrics scrape, not on every change)."""
        counts = {STATUS_OK: 0, STATUS_NEEDS_REAUTH: 0, STATUS_INACTIVE: 0, STATUS_UNINSTALLED: 0}
        for _, record in self.state.items(INSTALLS):
            status = record.get("status", STATUS_OK)
            counts[status] = counts.get(status, 0) + 1
        counts["pending"] = self.state.count(PENDING)
        for status, n in counts.items():
            self.metrics.installations.labels(status).set(n)

    # -- storing pairs (the crash window lives here) ------------------------------------------

    async def store(
        self,
        section: str,
        key: str,
        record: dict[str, Any],
        *,
        rollback: bool = False,
    ) -> None:
        """Put and fsync `record` (and, for a location, complete its pending INSTALL in the same
        commit). Callers reach here straight from GHL's answer, with no other await in between:
        that is the whole of the window in which a crash loses a pair.

        `rollback`: if the commit fails, restore what was there, so the failure the caller
        reports is the truth (installs); refreshes keep the new pair in memory instead.
        """
        previous = self.state.get(section, key)
        pending = self.state.get(PENDING, key) if section == INSTALLS else None
        forgotten = self.state.get(FORGOTTEN, key) if section == INSTALLS else None
        now_usable = usable(record)
        self.state.put(section, key, record)
        if pending is not None and now_usable:
            self.state.delete(PENDING, key)
        if forgotten is not None and now_usable:
            self.state.delete(FORGOTTEN, key)  # installed again: reconciliations mint it again
        try:
            await self.state.commit()
        except OSError:
            if rollback and self.state.get(section, key) is record:
                if previous is None:
                    self.state.delete(section, key)
                else:
                    self.state.put(section, key, previous)
                if pending is not None and self.state.get(PENDING, key) is None:
                    self.state.put(PENDING, key, pending)
                if forgotten is not None and self.state.get(FORGOTTEN, key) is None:
                    self.state.put(FORGOTTEN, key, forgotten)
            raise
        if section == INSTALLS and now_usable and not usable(previous):
            for callback in self.on_usable:
                callback(key)

    async def durable(self, token: str) -> str:
        """`token`, once the state is on disk: the pair in memory may be one whose commit failed,
        and a pair is never used before it is durable (its refresh token is single-use)."""
        if self.state.dirty:
            await self.state.commit()
        return token

    async def keep_pending(self, location_id: str, company_id: str, event_at: float | None) -> None:
        """Durably remember an INSTALL that is not complete yet (OSError if it cannot be)."""
        previous = self.state.get(PENDING, location_id) or {}
        record = {
            "company_id": company_id or previous.get("company_id", ""),
            "event_at": event_at if event_at is not None else previous.get("event_at"),
            "received_at": previous.get("received_at", time.time()),
        }
        if record != previous:
            self.state.put(PENDING, location_id, record)
            await self.state.commit()

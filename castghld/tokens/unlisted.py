"""Locations GHL's list of installed locations lacks: confirmed gone before they are marked
``uninstalled``.

One list is not enough: pages shift when a location is uninstalled between two page reads, and
GHL's index may lag an install. A location marked ``uninstalled`` is not texted for, so a wrong
mark loses messages until the next reconciliation. Guarantees:

- A location is marked only on a complete list (`GHLClient.installed_locations`) that lacks it,
  and only once confirmed: GHL refuses to mint its token (``POST /oauth/locationToken`` answered
  400/404 other than "Location is not active", which says nothing about the install), or the
  previous complete list lacked it too (section ``unlisted``, by location id: ``at``, the first
  such list; kept across restarts, cleared by any list that names the location and by GHL's
  INSTALL webhook for it).
- A mint that succeeds is GHL saying the location is installed: its new pair is stored and
  nothing is marked. A mint that fails otherwise (5xx, timeouts, the company token) confirms
  nothing.
- A location installed (or reinstalled) after the list was asked for, or whose INSTALL webhook
  arrived since, is never marked from it; a mark is committed before `InstallStore.on_departed`
  is told.
"""

from __future__ import annotations

import asyncio

from castghld.ghl import GHLError, TokenUnavailable
from castghld.tokens.agency import MINT_CONCURRENCY, Minter, Uninstalled
from castghld.tokens.store import (
    INSTALLS,
    SOURCE_RECONCILED,
    STATUS_UNINSTALLED,
    UNLISTED,
    InstallStore,
    log,
)

REFUSED_STATUSES = (400, 404)  # GHL will not mint a location token for it


def refused(error: GHLError) -> bool:
    """Whether a mint's error says the app is not installed there (not a passing failure, not a
    suspended location)."""
    return error.status in REFUSED_STATUSES and "not active" not in error.message.lower()


class UnlistedLocations:
    """Confirms and marks the locations a complete list lacks (see the module docstring)."""

    def __init__(self, store: InstallStore, minter: Minter):
        self.store = store
        self.state = store.state
        self.minter = minter

    def _marked_from(self, location_id: str, asked_at: float) -> bool:
        """Whether the location may be marked from a list asked for at `asked_at`: installed,
        and GHL has not said so since (`InstallStore.installed_since`)."""
        record = self.state.get(INSTALLS, location_id)
        return (
            record is not None
            and record.get("status") != STATUS_UNINSTALLED
            and self.store.installed_since(location_id, record) < asked_at
        )

    async def run(
        self, company_id: str, listed: set[str], asked_at: float
    ) -> tuple[list[str], list[str]]:
        """For the company's locations missing from `listed` (a complete list asked for at
        `asked_at`): (marked ``uninstalled``, durably; missing but not confirmed)."""
        missing = [
            lid
            for lid, record in self.state.items(INSTALLS)
            if record.get("company_id") == company_id
            and lid not in listed
            and self._marked_from(lid, asked_at)
        ]
        confirmed: dict[str, str] = {}
        unconfirmed: list[str] = []

        async def worker() -> None:
            while missing:
                location_id = missing.pop(0)
                reason = await self._confirm(company_id, location_id, asked_at)
                if reason:
                    confirmed[location_id] = reason
                elif self._marked_from(location_id, asked_at):
                    unconfirmed.append(location_id)

        await asyncio.gather(*(worker() for _ in range(min(MINT_CONCURRENCY, len(missing)))))
        return await self._mark(company_id, confirmed, asked_at), sorted(unconfirmed)

    async def _confirm(self, company_id: str, location_id: str, asked_at: float) -> str:
        """Why the location is confirmed gone, or '' (then its first absence is noted)."""
        try:
            await self.minter.mint_location(company_id, location_id, SOURCE_RECONCILED)
        except Uninstalled:
            return ""  # its UNINSTALL arrived meanwhile and deleted it
        except GHLError as e:
            if refused(e):
                return f"GHL refuses to mint its token ({e.message})"
            why = str(e)
        except TokenUnavailable as e:
            why = str(e)
        else:
            self.state.delete(UNLISTED, location_id)
            log.info(
                "location=%s is missing from GHL's list of installed locations but GHL minted "
                "its token: still installed",
                location_id,
                extra={"location_id": location_id, "outcome": "kept", "reason": "minted"},
            )
            return ""
        record = self.state.get(INSTALLS, location_id) or {}
        first = self.state.get(UNLISTED, location_id)
        if first is not None and first["at"] > self.store.installed_since(location_id, record):
            return "missing from two consecutive complete lists"
        self.state.put(UNLISTED, location_id, {"at": asked_at})
        log.warning(
            "location=%s is missing from GHL's list of installed locations and its mint failed "
            "(%s); still texted for, marked if the next complete list lacks it too",
            location_id,
            why,
            extra={"location_id": location_id, "outcome": "unconfirmed", "reason": why},
        )
        return ""

    async def _mark(self, company_id: str, confirmed: dict[str, str], asked_at: float) -> list[str]:
        """Mark `confirmed` ``uninstalled`` (committed), those still installed before
        `asked_at`; the ones marked."""
        marked = []
        for location_id in sorted(confirmed):
            record = self.state.get(INSTALLS, location_id)
            if self._marked_from(location_id, asked_at):
                self.state.put(INSTALLS, location_id, {**record, "status": STATUS_UNINSTALLED})
                self.state.delete(UNLISTED, location_id)
                marked.append(location_id)
        if self.state.dirty:
            await self.state.commit()
        for location_id in marked:
            log.warning(
                "location=%s is no longer installed at GHL (company=%s; %s); not texted for "
                "until it is installed again",
                location_id,
                company_id,
                confirmed[location_id],
                extra={"location_id": location_id, "outcome": "marked_uninstalled"},
            )
        self.store.departure_durable(marked)
        return marked

"""Reconciliation: GHL's list of the locations our app is installed in, against ours; and the
expiry of pending installs and UNINSTALL tombstones.

Guarantees:

- A reconciliation (`Reconciler.reconcile`) runs after every company token is stored, after an
  INSTALL webhook that could not be completed at once, at startup and every
  ``tokens.reconcile_interval``: it reads GHL's whole list however GHL pages it
  (`GHLClient.installed_locations`), mints every location listed as installed that has no usable
  pair and marks ``uninstalled`` the ones GHL no longer lists once that is confirmed
  (`unlisted.py`: GHL refuses to mint their token, or two consecutive complete lists lack them).
  They are not texted for; their tokens are kept in case GHL lists them again. A mint that fails
  is kept pending and retried by the next reconciliation. A location deleted by ``castghld
  forget`` is not minted although GHL lists it, until a new INSTALL webhook or an OAuth install
  (`lifecycle.py`).
- Nothing is marked on a list that could not be read completely (what it does list is minted),
  nor on an empty list while we hold usable locations of the company (more likely a wrong
  ``ghl.app_id``), nor for a location installed after the list was asked for.
- A pending INSTALL never listed for `PENDING_MAX_AGE` is logged at error and dropped; UNINSTALL
  tombstones and the dates of INSTALL webhooks for installed locations are kept `TOMBSTONE_AGE`.
- One reconciliation runs at a time; one requested while another runs follows it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from castghld.ghl import GHLClient, GHLError, IncompleteList, TokenUnavailable, refresh_once_on_401
from castghld.tokens.agency import Minter
from castghld.tokens.flight import SingleFlight
from castghld.tokens.refresh import Refresher
from castghld.tokens.store import (
    COMPANIES,
    FORGOTTEN,
    INSTALL_EVENTS,
    INSTALLS,
    PENDING,
    SOURCE_RECONCILED,
    STATUS_NEEDS_REAUTH,
    STATUS_UNINSTALLED,
    UNDATED_UNINSTALLS,
    UNINSTALLS,
    UNLISTED,
    InstallStore,
    log,
    usable,
)
from castghld.tokens.unlisted import UnlistedLocations

PENDING_MAX_AGE = 7 * 86400.0
TOMBSTONE_AGE = 30 * 86400.0


class Reconciler:
    """Runs reconciliations (see the module docstring), in the background or when asked."""

    def __init__(
        self,
        store: InstallStore,
        flights: SingleFlight,
        refresher: Refresher,
        minter: Minter,
        ghl: GHLClient,
    ):
        self.store = store
        self.state = store.state
        self.flights = flights
        self.refresher = refresher
        self.minter = minter
        self.ghl = ghl
        self.confirmations = UnlistedLocations(store, minter)
        self.task: asyncio.Task | None = None  # the reconciliation running in the background
        self._again = False

    def request(self) -> None:
        """Run a reconciliation soon (in the background); one more after a running one."""
        if self.flights.stopping:
            return
        if self.task is not None and not self.task.done():
            self._again = True
            return
        self.task = asyncio.ensure_future(self._in_background())

    async def _in_background(self) -> None:
        while True:
            self._again = False
            try:
                await self.reconcile()
            except Exception:
                log.exception(
                    "reconciliation failed; next one in %.0fs",
                    self.store.config.tokens.reconcile_interval,
                )
            if not self._again or self.flights.stopping:
                return

    async def reconcile_forever(self) -> None:
        """A reconciliation every `tokens.reconcile_interval` (read at each wait)."""
        while True:
            if self.state.count(COMPANIES) or self.state.count(PENDING):
                self.request()
            else:  # direct installs only: no reconciliation, but old tombstones still expire
                try:
                    await self.expire_pending()
                except OSError as e:
                    log.warning("cannot expire old UNINSTALL records now: %s", e.strerror)
            await self.store.periods.wait(lambda: self.store.config.tokens.reconcile_interval)

    async def reconcile(self) -> dict[str, Any]:
        """Compare every company's installed locations at GHL with ours; mint and mark.

        Returns ``{"minted": [...], "marked": [...], "unconfirmed": [...], "failed": {location:
        reason}, "companies": {company: error}}``: ``unconfirmed`` are the locations missing from
        one complete list that GHL did not confirm gone (marked if the next complete list lacks
        them too); ``companies`` those whose list could not be read completely (nothing of theirs
        is marked; the locations such a list does give are minted).
        """
        report: dict[str, Any] = {
            "minted": [],
            "marked": [],
            "unconfirmed": [],
            "failed": {},
            "companies": {},
        }
        for company_id, company in self.state.items(COMPANIES):
            if company.get("status") == STATUS_NEEDS_REAUTH:
                report["companies"][company_id] = "agency token needs reauthorisation"
                continue
            asked_at = time.time()
            complete = True
            try:
                listed = await self._installed_locations(company_id)
            except IncompleteList as e:
                listed, complete = e.ids, False
                report["companies"][company_id] = str(e)
                log.warning(
                    "reconcile company=%s: %s; minting the %d it lists, marking nothing",
                    company_id,
                    e,
                    len(listed),
                    extra={"company_id": company_id, "outcome": "incomplete", "reason": str(e)},
                )
            except (GHLError, TokenUnavailable) as e:
                report["companies"][company_id] = str(e)
                log.warning(
                    "reconcile company=%s: cannot read GHL's installed locations: %s",
                    company_id,
                    e,
                    extra={"company_id": company_id, "outcome": "failed", "reason": str(e)},
                )
                continue
            await self._reconcile_company(company_id, listed, complete, asked_at, report)
        await self.expire_pending()
        if report["minted"] or report["marked"] or report["failed"] or report["unconfirmed"]:
            log.info(
                "reconciliation: minted=%d marked_uninstalled=%d unconfirmed=%d failed=%d",
                len(report["minted"]),
                len(report["marked"]),
                len(report["unconfirmed"]),
                len(report["failed"]),
            )
        return report

    async def _installed_locations(self, company_id: str) -> list[str]:
        return await refresh_once_on_401(
            lambda: self.refresher.company_token(company_id),
            lambda token: self.ghl.installed_locations(token, company_id),
            lambda rejected: self.refresher.refresh(COMPANIES, company_id, rejected),
        )

    async def _reconcile_company(
        self,
        company_id: str,
        listed: list[str],
        complete: bool,
        asked_at: float,
        report: dict[str, Any],
    ) -> None:
        """Mint what `listed` (GHL's answer to a request made at `asked_at`) has and we lack. If
        the list is `complete`, confirm and mark what we hold and it lacks, unless it was
        installed after the request was made (the list may predate it)."""
        ours = [
            lid
            for lid, r in self.state.items(INSTALLS)
            if r.get("company_id") == company_id and usable(r)
        ]
        if not listed and ours:
            # More likely a wrong ghl.app_id than every location uninstalled at once (the agency
            # UNINSTALL webhook would say so): never stop texting on an empty list.
            report["companies"][company_id] = "GHL lists no installed location; nothing marked"
            log.warning(
                "reconcile company=%s: GHL lists no location with app %s installed, we hold %d; "
                "marking nothing (check ghl.app_id)",
                company_id,
                self.store.config.ghl.app_id,
                len(ours),
                extra={"company_id": company_id, "outcome": "skipped", "reason": "empty list"},
            )
            return
        for location_id in listed:  # listed again: a later absence is a first one
            self.state.delete(UNLISTED, location_id)
        if complete:
            marked, unconfirmed = await self.confirmations.run(company_id, set(listed), asked_at)
            report["marked"] += marked
            report["unconfirmed"] += unconfirmed
        to_mint = []
        for location_id in listed:
            record = self.state.get(INSTALLS, location_id)
            if record is None and self.state.get(FORGOTTEN, location_id) is not None:
                continue  # `castghld forget`: until a new INSTALL or OAuth install
            if record is None or record.get("status") in (STATUS_UNINSTALLED, STATUS_NEEDS_REAUTH):
                to_mint.append(location_id)
            elif self.state.get(PENDING, location_id) is not None:
                self.state.delete(PENDING, location_id)
        minted, failed = await self.minter.mint_many(company_id, to_mint, SOURCE_RECONCILED)
        report["minted"] += minted
        report["failed"].update(failed)
        if self.state.dirty:
            await self.state.commit()

    async def expire_pending(self) -> None:
        """Drop pending installs older than `PENDING_MAX_AGE` and tombstones older than
        `TOMBSTONE_AGE` (durably)."""
        horizon = time.time() - PENDING_MAX_AGE
        expired = [lid for lid, p in self.state.items(PENDING) if p.get("received_at", 0) < horizon]
        for lid in expired:
            self.state.delete(PENDING, lid)
            log.error(
                "INSTALL of location=%s was never listed by GHL in %d days; dropped (install it "
                "again from the marketplace)",
                lid,
                PENDING_MAX_AGE // 86400,
                extra={"location_id": lid, "outcome": "dropped", "reason": "pending too long"},
            )
        for location_id, _ in self.state.items(UNLISTED):
            if self.store.get(location_id) is None:  # uninstalled or marked since
                self.state.delete(UNLISTED, location_id)
        horizon = time.time() - TOMBSTONE_AGE
        for section in (UNINSTALLS, UNDATED_UNINSTALLS, INSTALL_EVENTS):
            for key, tombstone in self.state.items(section):
                if tombstone["at"] < horizon:
                    self.state.delete(section, key)
        if self.state.dirty:
            await self.state.commit()

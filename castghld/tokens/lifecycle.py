"""The install lifecycle: the OAuth code exchange, GHL's INSTALL and UNINSTALL webhooks.

Guarantees:

- A code exchange runs as a task of its own that a stop waits for like a refresh (`flight.py`):
  once the code is sent, GHL may have spent it, so its answer must be stored. Its pair is stored
  at once (rolled back if the commit fails, `store.py`), and a refresh or mint in flight for the
  location then finds its record replaced and discards its own answer.
- An agency (company) install mints every approved location, then asks for a reconciliation:
  GHL's list of installed locations is the truth (`reconcile.py`).
- An INSTALL webhook that cannot be completed at once (no company token yet, no ``companyId``,
  mint failed) is kept in the state file (section ``pending_installs``) before the webhook is
  answered, until a mint or a code exchange completes it, so agency installs never leave a
  location uninstalled.
- Ordering: an UNINSTALL dated before the location's install is ignored, so a late or retried
  UNINSTALL never deletes the pair of a reinstall. The install is dated by ``installed_at``, or
  by a later INSTALL webhook for a location we hold installed (section ``install_events``: a
  reinstall whose UNINSTALL is late; answered "already installed"). An INSTALL dated before the
  location's last UNINSTALL is ignored. An UNINSTALL without a date but with a ``webhookId`` is
  dated by its first delivery (section ``undated_uninstalls``); one with neither (the body GHL's
  app-uninstall doc shows) by its arrival.
- ``castghld forget`` is an UNINSTALL dated now that also keeps the location out of
  reconciliations (section ``forgotten``), which would otherwise mint it again while GHL lists it;
  a new INSTALL webhook or an OAuth install of the location ends that.
- `InstallStore.on_departed` is told of every location whose pair an UNINSTALL or a forget
  deleted, after the commit.
"""

from __future__ import annotations

import time
from typing import Any

from castghld.ghl import GHLClient, GHLError, TokenUnavailable
from castghld.tokens.agency import Minter
from castghld.tokens.flight import SingleFlight
from castghld.tokens.reconcile import Reconciler
from castghld.tokens.store import (
    COMPANIES,
    FORGOTTEN,
    INSTALL_EVENTS,
    INSTALLS,
    PENDING,
    SOURCE_AGENCY,
    SOURCE_DIRECT,
    UNDATED_UNINSTALLS,
    UNINSTALLS,
    UNLISTED,
    InstallStore,
    log,
    pair_from_answer,
    usable,
)


def _after(installed: float, event_at: float) -> bool:
    """Whether an UNINSTALL dated `event_at` comes after an install dated `installed`. GHL dates
    its webhooks to the millisecond: one stamped in the millisecond of the install cannot be
    ordered against it and counts as after it (a tie uninstalls), not as before it by the
    truncation of its timestamp."""
    return int(installed * 1000) <= round(event_at * 1000)


class Lifecycle:
    """Installs and uninstalls (see the module docstring)."""

    def __init__(
        self,
        store: InstallStore,
        flights: SingleFlight,
        minter: Minter,
        reconciler: Reconciler,
        ghl: GHLClient,
    ):
        self.store = store
        self.state = store.state
        self.flights = flights
        self.minter = minter
        self.reconciler = reconciler
        self.ghl = ghl

    # -- install ------------------------------------------------------------------------------

    async def install_from_code(self, code: str) -> dict[str, Any]:
        """`_install_from_code` as a task of its own that a stop waits for like a refresh: once
        the code is sent, GHL may have spent it, so its answer must be stored."""
        return await self.flights.exchange(lambda: self._install_from_code(code))

    async def _install_from_code(self, code: str) -> dict[str, Any]:
        """Exchange an OAuth code; store the pair(s) durably. Returns what was installed:
        ``{"locations": [...], "company_id": ..., "failed": {location_id: reason}}`` (a failed
        mint is kept as a pending install and retried by the reconciliation that follows).

        The exchange takes part in the location's single flight through generations: its pair is
        stored at once, and a refresh or mint in flight for the location then finds its record
        replaced and discards its own answer.
        """
        answer = await self.ghl.exchange_code(code)
        now = time.time()
        pair = pair_from_answer(answer, now)
        company_id = str(answer.get("companyId") or "")
        if answer.get("userType") == "Company":
            if not company_id:
                raise GHLError(502, "GHL's agency token answer has no companyId")
            approved = [str(x) for x in answer.get("approvedLocations") or []]
            await self.store.store(
                COMPANIES,
                company_id,
                {**pair, "installed_at": now, "approved_locations": approved},
                rollback=True,
            )
            log.info(
                "agency install company=%s approved_locations=%d",
                company_id,
                len(approved),
                extra={"company_id": company_id, "outcome": "installed"},
            )
            minted, failed = await self.minter.mint_many(company_id, approved, SOURCE_AGENCY)
            # Bulk installs may approve no location in the answer, and INSTALL webhooks may have
            # come first: GHL's list of installed locations is the truth.
            self.reconciler.request()
            return {"locations": minted, "company_id": company_id, "failed": failed}
        location_id = str(answer.get("locationId") or "")
        if not location_id:
            raise GHLError(502, "GHL's token answer has no locationId")
        record = {**pair, "company_id": company_id, "installed_at": now, "source": SOURCE_DIRECT}
        await self.store.store(INSTALLS, location_id, record, rollback=True)
        log.info(
            "installed location=%s company=%s",
            location_id,
            company_id or "-",
            extra={"location_id": location_id, "outcome": "installed", "reason": "oauth"},
        )
        return {"locations": [location_id], "company_id": company_id, "failed": {}}

    async def on_install_webhook(
        self, location_id: str, company_id: str, event_at: float | None
    ) -> str:
        """GHL's INSTALL app webhook. Returns what was done; OSError if it could not be kept.

        Completed at once when we hold the company's token and the mint succeeds; otherwise kept
        durably (before this returns) and completed by a reconciliation or the OAuth callback.
        """
        if not location_id:
            if company_id and self.state.get(COMPANIES, company_id) is not None:
                self.reconciler.request()
                return "company install; reconciling"
            return "company install; completed when the agency token arrives"
        tombstone = self.state.get(UNINSTALLS, location_id)
        if tombstone is not None and event_at is not None and event_at < tombstone["at"]:
            return "older than the location's last UNINSTALL; ignored"
        if usable(self.state.get(INSTALLS, location_id)):
            # GHL installed it again (its UNINSTALL lost or late): a reconciliation whose list
            # was asked for before now must not mark it uninstalled, and an absence from a list
            # before now does not count towards its confirmation, after a restart too
            # (`unlisted.py`).
            now = time.time()
            at = min(event_at, now) if event_at is not None else now
            if at > self.store.install_date(location_id, self.state.get(INSTALLS, location_id)):
                self.state.put(INSTALL_EVENTS, location_id, {"at": at})
            self.store.install_heard[location_id] = now
            self.state.delete(UNLISTED, location_id)
            if self.state.dirty:
                await self.state.commit()
            return "already installed"
        if self.state.get(FORGOTTEN, location_id) is not None:
            # A new INSTALL after `castghld forget`: GHL installs it again (committed with the
            # pending install, or just below when that is unchanged).
            self.state.delete(FORGOTTEN, location_id)
        await self.store.keep_pending(location_id, company_id, event_at)
        if self.state.dirty:
            await self.state.commit()
        if company_id and self.state.get(COMPANIES, company_id) is not None:
            try:
                await self.minter.mint_location(company_id, location_id, SOURCE_AGENCY)
                return "installed with the agency token"
            except (GHLError, TokenUnavailable) as e:
                log.warning(
                    "INSTALL location=%s: mint failed (%s); kept, retried by reconciliation",
                    location_id,
                    e,
                    extra={"location_id": location_id, "outcome": "pending", "reason": str(e)},
                )
        self.reconciler.request()
        return "kept; completed by the OAuth callback or the next reconciliation"

    # -- uninstall ----------------------------------------------------------------------------

    async def uninstall(
        self,
        location_id: str = "",
        company_id: str = "",
        event_at: float | None = None,
        webhook_id: str = "",
        *,
        forgotten: bool = False,
    ) -> list[str]:
        """Forget a location, or a company and every location installed through it, unless the
        pair is newer than the UNINSTALL (see the module docstring: ordering). Returns the
        locations whose pair was deleted, once that is on disk (`forgotten`: and marked so in
        the same commit, see `forget`)."""
        event_at = self._uninstall_date(event_at, webhook_id, location_id, company_id)
        targets: list[str] = []
        if location_id:
            targets = [location_id]
        elif company_id:
            targets = self._forget_company(company_id, event_at)
        removed = []
        for lid in dict.fromkeys(targets):
            if self._forget_location(lid, event_at):
                removed.append(lid)
                if forgotten:
                    self.state.put(FORGOTTEN, lid, {"at": event_at})
        await self.state.commit()
        for lid in removed:
            log.info(
                "uninstalled location=%s",
                lid,
                extra={"location_id": lid, "outcome": "uninstalled"},
            )
        self.store.departure_durable(removed)
        return removed

    async def forget(self, location_id: str) -> bool:
        """`castghld forget`: an UNINSTALL dated now, and the location stays forgotten (section
        ``forgotten``: a reconciliation does not mint it although GHL still lists it) until a
        new INSTALL webhook or an OAuth install. Whether a pair was deleted."""
        removed = await self.uninstall(
            location_id=location_id, event_at=time.time(), forgotten=True
        )
        return bool(removed)

    def _uninstall_date(
        self, event_at: float | None, webhook_id: str, location_id: str, company_id: str
    ) -> float:
        """The date an UNINSTALL is ordered by: its timestamp (never ahead of our clock), else
        the first delivery of its webhookId, else its arrival."""
        if event_at is not None:
            # Nothing happened after we heard of it: a timestamp ahead of our clock (GHL's skew,
            # or a bad value) must not make a tombstone that outlives TOMBSTONE_AGE or outranks
            # the next reinstall.
            event_at = min(event_at, time.time())
        if event_at is None and webhook_id:
            # Dated by its first delivery, remembered in the state file: a retry of it after a
            # restart and a reinstall is older than the reinstall, so it deletes nothing.
            first = self.state.get(UNDATED_UNINSTALLS, webhook_id)
            event_at = first["at"] if first is not None else time.time()
            if first is None:
                self.state.put(UNDATED_UNINSTALLS, webhook_id, {"at": event_at})
        if event_at is None:
            # GHL's app-uninstall doc shows a body with neither: dated by its arrival. A retry of
            # it after a reinstall cannot be told from a new one (nothing identifies it).
            event_at = time.time()
            log.info(
                "UNINSTALL location=%s company=%s without timestamp or webhookId: dated by its "
                "arrival",
                location_id or "-",
                company_id or "-",
            )
        return event_at

    def _forget_company(self, company_id: str, event_at: float) -> list[str]:
        """Delete the company's agency token if the UNINSTALL is newer (not committed yet); the
        locations installed or pending through it."""
        company = self.state.get(COMPANIES, company_id)
        if company is not None and _after(company.get("installed_at", 0.0), event_at):
            self.state.delete(COMPANIES, company_id)
        targets = [
            lid for lid, r in self.state.items(INSTALLS) if r.get("company_id") == company_id
        ]
        targets += [
            lid for lid, p in self.state.items(PENDING) if p.get("company_id") == company_id
        ]
        return targets

    def _forget_location(self, location_id: str, event_at: float) -> bool:
        """Apply the UNINSTALL to one location (not committed yet): drop its pending INSTALL if
        older, raise its tombstone, delete its pair. Whether a pair was deleted."""
        record = self.state.get(INSTALLS, location_id)
        if record is not None and not _after(
            self.store.install_date(location_id, record), event_at
        ):
            log.info(
                "UNINSTALL location=%s is older than its install; tokens kept",
                location_id,
                extra={
                    "location_id": location_id,
                    "outcome": "ignored",
                    "reason": "stale uninstall",
                },
            )
            return False
        pending = self.state.get(PENDING, location_id)
        if pending is not None and (pending.get("event_at") or 0) <= event_at:
            self.state.delete(PENDING, location_id)
        tombstone = self.state.get(UNINSTALLS, location_id)
        if tombstone is None or tombstone["at"] < event_at:
            self.state.put(UNINSTALLS, location_id, {"at": event_at})
        if record is None:
            return False
        self.state.delete(INSTALLS, location_id)
        self.state.delete(INSTALL_EVENTS, location_id)
        return True

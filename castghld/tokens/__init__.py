"""Installations and their OAuth token pairs: install, agency installs, reconciliation, refresh,
uninstall.

`Installations` is the front the rest of castghld uses; the work is done by small classes that
share one `InstallStore`, each in the module of its job, with that job's guarantees:

- `store.py`: the install records (sections, statuses, the ``Records`` layout), lookups, and the
  commit that makes a pair durable, with rollback for installs: the crash window lives there.
- `flight.py`: single flight per pair (refreshes, mints) and for code exchanges, generations, and
  what a stop does with the requests in flight.
- `lifecycle.py`: the OAuth code exchange, INSTALL (kept pending when it cannot complete) and
  UNINSTALL with its ordering against reinstalls.
- `agency.py`: location pairs minted with a company's token, retried, kept pending on failure.
- `reconcile.py`: GHL's list of installed locations against ours (mint, mark ``uninstalled``),
  expiry of pending installs and tombstones.
- `unlisted.py`: locations GHL's list lacks, confirmed gone before they are marked.
- `refresh.py`: access tokens for callers, refresh, re-mint on ``invalid_grant``, the sweep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from castghld.config import Config
from castghld.ghl import GHLClient, TokenUnavailable
from castghld.metrics import Metrics
from castghld.state import StateStore
from castghld.tokens.agency import MINT_CONCURRENCY, MINT_RETRY_SECONDS, Minter, Uninstalled
from castghld.tokens.flight import REFRESH_STOP_WAIT, SingleFlight
from castghld.tokens.lifecycle import Lifecycle
from castghld.tokens.reconcile import PENDING_MAX_AGE, TOMBSTONE_AGE, Reconciler
from castghld.tokens.refresh import (
    EXPIRY_SLACK,
    REFRESHES_PER_SECOND,
    SWEEP_CONCURRENCY,
    Refresher,
)
from castghld.tokens.store import (
    COMPANIES,
    FORGOTTEN,
    INSTALLS,
    MAX_EXPIRES_IN,
    PENDING,
    SOURCE_AGENCY,
    SOURCE_DIRECT,
    SOURCE_RECONCILED,
    STATUS_INACTIVE,
    STATUS_NEEDS_REAUTH,
    STATUS_OK,
    STATUS_UNINSTALLED,
    UNDATED_UNINSTALLS,
    UNINSTALLS,
    InstallStore,
)

__all__ = [
    "COMPANIES",
    "EXPIRY_SLACK",
    "FORGOTTEN",
    "INSTALLS",
    "MAX_EXPIRES_IN",
    "MINT_CONCURRENCY",
    "MINT_RETRY_SECONDS",
    "PENDING",
    "PENDING_MAX_AGE",
    "REFRESHES_PER_SECOND",
    "REFRESH_STOP_WAIT",
    "SOURCE_AGENCY",
    "SOURCE_DIRECT",
    "SOURCE_RECONCILED",
    "STATUS_INACTIVE",
    "STATUS_NEEDS_REAUTH",
    "STATUS_OK",
    "STATUS_UNINSTALLED",
    "SWEEP_CONCURRENCY",
    "TOMBSTONE_AGE",
    "UNDATED_UNINSTALLS",
    "UNINSTALLS",
    "Installations",
    "TokenUnavailable",
    "Uninstalled",
]


class Installations:
    """Every install of this daemon and its tokens; delegates to the parts named in the module
    docstring and runs their background loops (the sweep, the reconciliation timer)."""

    def __init__(self, config: Config, state: StateStore, ghl: GHLClient, metrics: Metrics):
        self.ghl = ghl
        self.metrics = metrics
        self._store = InstallStore(config, state, metrics)
        self._flights = SingleFlight()
        self._refresher = Refresher(self._store, self._flights, ghl, metrics)
        self._minter = Minter(self._store, self._flights, self._refresher, ghl)
        self._refresher.mint_now = self._minter.mint_now
        self._reconciler = Reconciler(
            self._store, self._flights, self._refresher, self._minter, ghl
        )
        self._lifecycle = Lifecycle(self._store, self._flights, self._minter, self._reconciler, ghl)
        self._sweep_task: asyncio.Task | None = None
        self._reconcile_loop_task: asyncio.Task | None = None
        metrics.before_scrape.append(self.update_metrics)

    @property
    def config(self) -> Config:
        return self._store.config

    @config.setter
    def config(self, config: Config) -> None:
        # A reload replaces the config here (`Daemon.reload`); every part reads it from the store,
        # and the loops' waits in progress are measured against the new intervals.
        self._store.config = config
        self._store.periods.config_changed()

    @property
    def state(self) -> StateStore:
        return self._store.state

    @property
    def on_usable(self) -> list[Callable[[str], None]]:
        """Called with a location id once its pair is on disk and usable (install, reinstall,
        recovery from inactive): work that waited for the location can go on."""
        return self._store.on_usable

    @property
    def on_departed(self) -> list[Callable[[str], None]]:
        """Called with a location id once its departure is durable (UNINSTALL, forget, confirmed
        unlisted by a reconciliation): nothing more is sent or reported for it."""
        return self._store.on_departed

    @property
    def _reconcile_task(self) -> asyncio.Task | None:
        """The reconciliation running in the background, if any (tests wait for it)."""
        return self._reconciler.task

    # -- lookups (store.py) --------------------------------------------------------------------

    def get(self, location_id: str) -> dict[str, Any] | None:
        """The location's record, or None if it is not installed (a location GHL no longer lists
        counts as not installed: nothing is sent or delivered for it)."""
        return self._store.get(location_id)

    def location_ids(self) -> list[str]:
        return self._store.location_ids()

    def departed(self) -> set[str]:
        """Locations that left and are remembered (UNINSTALL or `forget` within `TOMBSTONE_AGE`,
        or marked uninstalled by reconciliation)."""
        return self._store.departed()

    def pending(self) -> list[str]:
        """Location ids of INSTALL webhooks not completed yet."""
        return self._store.pending()

    def update_metrics(self) -> None:
        """Set the installation gauges (run on each /metrics scrape, not on every change)."""
        self._store.update_metrics()

    # -- install and uninstall (lifecycle.py, agency.py) --------------------------------------

    async def install_from_code(self, code: str) -> dict[str, Any]:
        """Exchange an OAuth code and store the pair(s): ``{"locations": [...], "company_id":
        ..., "failed": {location_id: reason}}``."""
        return await self._lifecycle.install_from_code(code)

    async def on_install_webhook(
        self, location_id: str, company_id: str, event_at: float | None
    ) -> str:
        """GHL's INSTALL app webhook. Returns what was done; OSError if it could not be kept."""
        return await self._lifecycle.on_install_webhook(location_id, company_id, event_at)

    async def uninstall(
        self,
        location_id: str = "",
        company_id: str = "",
        event_at: float | None = None,
        webhook_id: str = "",
    ) -> list[str]:
        """Forget a location, or a company and every location installed through it, unless the
        pair is newer than the UNINSTALL; the locations whose pair was deleted."""
        return await self._lifecycle.uninstall(location_id, company_id, event_at, webhook_id)

    async def forget(self, location_id: str) -> bool:
        """`castghld forget`: delete the location's pair, as an UNINSTALL dated now would, and
        keep reconciliations from minting it again until a new INSTALL or OAuth install. Whether
        a pair was deleted."""
        return await self._lifecycle.forget(location_id)

    async def mint_location(self, company_id: str, location_id: str, source: str) -> str:
        """Get and store a location pair with the company's token; its access token."""
        return await self._minter.mint_location(company_id, location_id, source)

    # -- reconciliation (reconcile.py) ---------------------------------------------------------

    def request_reconcile(self) -> None:
        """Run a reconciliation soon (in the background); one more after a running one."""
        self._reconciler.request()

    async def reconcile(self) -> dict[str, Any]:
        """Compare every company's installed locations at GHL with ours; mint and mark. Returns
        ``{"minted": [...], "marked": [...], "unconfirmed": [...], "failed": {...},
        "companies": {...}}``."""
        return await self._reconciler.reconcile()

    # -- tokens (refresh.py) -------------------------------------------------------------------

    async def access_token(self, location_id: str) -> str:
        """A durable, unexpired access token for the location (refreshing it if needed)."""
        return await self._refresher.access_token(location_id)

    async def refresh_after_401(self, location_id: str, rejected_token: str) -> str:
        return await self._refresher.refresh_after_401(location_id, rejected_token)

    async def refresh_due(self) -> int:
        """One sweep: refresh every pair expiring within the margin; returns how many succeeded."""
        return await self._refresher.refresh_due()

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        self._sweep_task = asyncio.ensure_future(self._refresher.sweep_forever())
        self._reconcile_loop_task = asyncio.ensure_future(self._reconciler.reconcile_forever())

    def begin_stop(self) -> None:
        """From now on no refresh or mint starts (callers get a retryable TokenUnavailable)."""
        self._flights.begin_stop()

    async def stop(self) -> None:
        """Stop the loops; let token requests in flight store their answers for up to
        `REFRESH_STOP_WAIT` from `begin_stop`, then cancel them (`SingleFlight.drain`)."""
        self.begin_stop()
        for task in (self._sweep_task, self._reconcile_loop_task, self._reconciler.task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        # Read from this module, not flight.py: the name callers see (and tests shorten).
        await self._flights.drain(REFRESH_STOP_WAIT)

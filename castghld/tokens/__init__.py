"""Installations and their OAuth token pairs: install, agency installs, reconciliation, refresh,
uninstall.

The token store is the most precious state the daemon has: losing a refresh token means the
customer must reinstall. Guarantees:

- A token pair GHL hands us (code exchange, refresh, location token) is `put` into the state store
  and committed (fsynced) with no other await in between; nothing uses a new access token before
  that commit has returned. The one window in which a crash loses a pair is unavoidable: between
  GHL's answer arriving and the fsync of the file that holds it. After that, the pair survives.
- An install (code exchange or mint) whose commit fails is rolled back in memory, so a caller told
  "not saved" (503) is telling the truth: it is not installed later when the disk recovers. A
  refreshed pair whose commit fails stays in memory (GHL already spent the old refresh token) and
  is not used until a later commit succeeds.
- GHL refresh tokens are single-use, so refreshes and mints are single-flight per location (and
  per company): every caller that needs one while one is in flight waits for that one. Each runs as
  its own task, so a cancelled caller never abandons an answer that must be stored.
- Generations: an answer (refresh, mint) is stored only if the record is still the one the request
  was made for (same refresh token and ``installed_at``). A refresh or mint in flight while the
  location is uninstalled, reinstalled (code exchange) or re-minted never overwrites the newer pair.
- Ordering: an UNINSTALL dated before the location's ``installed_at`` is ignored, so a late or
  retried UNINSTALL never deletes the pair of a reinstall; one without a date and without a
  ``webhookId`` never deletes a pair. An INSTALL dated before the location's last UNINSTALL is
  ignored.
- Agency installs never leave a location uninstalled: an INSTALL webhook that cannot be completed
  at once (no company token yet, no ``companyId``, mint failed) is kept in the state file
  (section ``pending_installs``) until a mint or a code exchange completes it, and a
  reconciliation (`reconcile`) runs after every company token is stored, after such an INSTALL,
  at startup and every ``tokens.reconcile_interval``: it mints every location GHL lists as
  installed that has no usable pair and marks ``uninstalled`` the ones GHL no longer lists (they
  are not texted for; their tokens are kept in case GHL lists them again). Mints are paced per
  company and retried on 429/5xx with backoff; one that still fails is retried by the next
  reconciliation. A pending INSTALL never listed for `PENDING_MAX_AGE` is logged at error and
  dropped.
- A location pair from an agency token that gets ``invalid_grant`` is re-minted with the company
  token before the location is marked ``needs_reauth``.
- `invalid_grant` otherwise marks the location ``needs_reauth`` (logged as an error once) and it is
  not refreshed again until it is reinstalled. "Location is not active" marks it ``inactive``,
  keeps the tokens and retries on later sweeps.
- A sweep at startup and every `tokens.refresh_interval` (with jitter) refreshes every pair that
  expires within `tokens.refresh_margin`, at most `REFRESHES_PER_SECOND` a second, soonest first.
- At shutdown no refresh or mint starts; those in flight get `REFRESH_STOP_WAIT` to store their
  answer, then they are cancelled and named in an error log line (never stored into a closed
  store).

Records (JSON, in state sections): ``installs`` by location id: ``access_token, refresh_token,
expires_at (epoch s), status, company_id, scope, installed_at, refreshed_at, source`` (``direct``,
``agency`` or ``reconciled``); ``companies`` by company id (+ ``approved_locations``);
``pending_installs`` by location id: ``company_id, event_at, received_at``; ``uninstalls`` by
location id: ``at`` (the last UNINSTALL's date, for ordering; kept `TOMBSTONE_AGE`);
``undated_uninstalls`` by webhookId: ``at`` (first delivery of an UNINSTALL without timestamp).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from castghld.config import Config
from castghld.ghl import GHLClient, GHLError, TokenUnavailable, refresh_once_on_401
from castghld.metrics import Metrics
from castghld.pacing import SlidingWindowLimiter, retry_delay
from castghld.state import StateStore

log = logging.getLogger("castghld.tokens")

INSTALLS = "installs"
COMPANIES = "companies"
PENDING = "pending_installs"
UNINSTALLS = "uninstalls"
WEBHOOKS = "undated_uninstalls"  # webhookId -> first seen, for UNINSTALLs without a timestamp
STATUS_OK = "ok"
STATUS_NEEDS_REAUTH = "needs_reauth"
STATUS_INACTIVE = "inactive"
STATUS_UNINSTALLED = "uninstalled"  # GHL no longer lists it (reconciliation): not texted for
SOURCE_DIRECT = "direct"
SOURCE_AGENCY = "agency"
SOURCE_RECONCILED = "reconciled"
REFRESHES_PER_SECOND = 10
SWEEP_CONCURRENCY = 8
MINT_CONCURRENCY = 8
# A mint answered 429/5xx/timeout is retried with backoff for this long; after that the next
# reconciliation tries again.
MINT_RETRY_SECONDS = 60.0
PENDING_MAX_AGE = 7 * 86400.0
TOMBSTONE_AGE = 30 * 86400.0
# At shutdown no new refresh starts; one already sent may have spent its single-use refresh token
# at GHL, so its answer must be stored: we wait for it up to this long after the stop began
# (longer than the HTTP request timeout, so such a refresh has either an answer or an error).
REFRESH_STOP_WAIT = 12.0
EXPIRY_SLACK = 120.0  # a token expiring sooner than this is refreshed before use


class Uninstalled(TokenUnavailable):
    """The location (or its company) was uninstalled while its token request was in flight."""


MAX_EXPIRES_IN = 90 * 86400.0  # far beyond GHL's ~1 day: anything longer is a bad answer


def _pair_from_answer(answer: dict[str, Any], now: float) -> dict[str, Any]:
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


def _same_generation(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """True if `a` and `b` are the same install of a location (status changes aside)."""
    if a is None or b is None:
        return a is b
    keys = ("refresh_token", "installed_at")
    return all(a.get(k) == b.get(k) for k in keys)


def _usable(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("status", STATUS_OK) == STATUS_OK


def _is_invalid_grant(error: GHLError) -> bool:
    text = f"{error.oauth_error} {error.message}".lower()
    return error.status in (400, 401) and "invalid_grant" in text


class Installations:
    def __init__(self, config: Config, state: StateStore, ghl: GHLClient, metrics: Metrics):
        self.config = config
        self.state = state
        self.ghl = ghl
        self.metrics = metrics
        self._in_flight: dict[tuple[str, str], asyncio.Task] = {}
        self._exchanges: set[asyncio.Task] = set()  # OAuth code exchanges (install_from_code)
        self._sweep_task: asyncio.Task | None = None
        self._reconcile_loop_task: asyncio.Task | None = None
        self._reconcile_task: asyncio.Task | None = None
        self._reconcile_again = False
        self._limiter = SlidingWindowLimiter(REFRESHES_PER_SECOND, 1.0)
        # Called with a location id once its pair is on disk and usable (install, reinstall,
        # recovery from inactive): work that waited for the location can go on.
        self.on_usable: list[Callable[[str], None]] = []
        self._stopping_since: float | None = None
        metrics.before_scrape.append(self.update_metrics)

    # -- lookups -------------------------------------------------------------------------------

    def get(self, location_id: str) -> dict[str, Any] | None:
        """The location's record, or None if it is not installed (a location GHL no longer lists
        counts as not installed: nothing is sent or delivered for it)."""
        record = self.state.get(INSTALLS, location_id)
        if record is None or record.get("status") == STATUS_UNINSTALLED:
            return None
        return record

    def location_ids(self) -> list[str]:
        return [
            location_id
            for location_id, record in self.state.items(INSTALLS)
            if record.get("status") != STATUS_UNINSTALLED
        ]

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

    async def _store(
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
        usable = _usable(record)
        self.state.put(section, key, record)
        if pending is not None and usable:
            self.state.delete(PENDING, key)
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
            raise
        if section == INSTALLS and usable and not _usable(previous):
            for callback in self.on_usable:
                callback(key)

    async def _put_and_commit(self, section: str, key: str, record: dict[str, Any]) -> None:
        self.state.put(section, key, record)
        await self.state.commit()

    # -- single flight -------------------------------------------------------------------------

    def _flight(self, section: str, key: str, make: Callable[[], Awaitable[str]]) -> asyncio.Task:
        """The task in flight for this pair, or a new one from `make` (refresh, mint)."""
        flight = (section, key)
        task = self._in_flight.get(flight)
        if task is None:
            if self._stopping_since is not None:
                raise TokenUnavailable(key, "castghld is stopping", retryable=True)
            task = asyncio.ensure_future(make())
            self._in_flight[flight] = task

            def done(finished: asyncio.Task) -> None:
                if self._in_flight.get(flight) is finished:
                    del self._in_flight[flight]

            task.add_done_callback(done)
        return task

    # -- install ------------------------------------------------------------------------------

    async def install_from_code(self, code: str) -> dict[str, Any]:
        """`_install_from_code` as a task of its own that a stop waits for like a refresh: once
        the code is sent, GHL may have spent it, so its answer must be stored."""
        if self._stopping_since is not None:
            raise TokenUnavailable("-", "castghld is stopping", retryable=True)
        task = asyncio.ensure_future(self._install_from_code(code))
        self._exchanges.add(task)
        task.add_done_callback(self._exchanges.discard)
        return await asyncio.shield(task)

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
        pair = _pair_from_answer(answer, now)
        company_id = str(answer.get("companyId") or "")
        if answer.get("userType") == "Company":
            if not company_id:
                raise GHLError(502, "GHL's agency token answer has no companyId")
            approved = [str(x) for x in answer.get("approvedLocations") or []]
            await self._store(
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
            minted, failed = await self._mint_many(company_id, approved, SOURCE_AGENCY)
            # Bulk installs may approve no location in the answer, and INSTALL webhooks may have
            # come first: GHL's list of installed locations is the truth.
            self.request_reconcile()
            return {"locations": minted, "company_id": company_id, "failed": failed}
        location_id = str(answer.get("locationId") or "")
        if not location_id:
            raise GHLError(502, "GHL's token answer has no locationId")
        record = {**pair, "company_id": company_id, "installed_at": now, "source": SOURCE_DIRECT}
        await self._store(INSTALLS, location_id, record, rollback=True)
        log.info(
            "installed location=%s company=%s",
            location_id,
            company_id or "-",
            extra={"location_id": location_id, "outcome": "installed", "reason": "oauth"},
        )
        return {"locations": [location_id], "company_id": company_id, "failed": {}}

    async def _mint_many(
        self, company_id: str, location_ids: list[str], source: str
    ) -> tuple[list[str], dict[str, str]]:
        """Mint each location (a few at a time: their commits coalesce into one write per round).
        A failed mint is kept as a pending install; returns (minted, {failed: reason})."""
        failed: dict[str, str] = {}
        minted: list[str] = []
        queue = list(location_ids)

        async def worker() -> None:
            while queue:
                location_id = queue.pop(0)
                try:
                    await self.mint_location(company_id, location_id, source)
                    minted.append(location_id)
                except Uninstalled as e:
                    failed[location_id] = str(e)  # nothing to keep pending: GHL uninstalled it
                except (GHLError, TokenUnavailable) as e:
                    failed[location_id] = str(e)
                    if self.state.get(COMPANIES, company_id) is None:
                        continue  # the company was uninstalled meanwhile: nothing to complete
                    log.error(
                        "minting token failed company=%s location=%s: %s; kept, retried by the "
                        "next reconciliation",
                        company_id,
                        location_id,
                        e,
                        extra={"location_id": location_id, "outcome": "mint_failed"},
                    )
                    await self._keep_pending(location_id, company_id, None)

        workers = min(MINT_CONCURRENCY, len(queue))
        await asyncio.gather(*(worker() for _ in range(workers)))
        minted.sort(key=location_ids.index)
        return minted, failed

    async def mint_location(self, company_id: str, location_id: str, source: str) -> str:
        """Get and store a location pair with the company's token (`/oauth/locationToken`); its
        access token. Single flight with refreshes: if one is in flight for the location, wait
        for it, and mint only if the location is still not usable."""
        while True:
            task = self._in_flight.get((INSTALLS, location_id))
            if task is None:
                break
            await asyncio.wait([task])
            record = self.get(location_id)
            if _usable(record):
                return await self._durable(record["access_token"])
        base = self.state.get(INSTALLS, location_id)
        task = self._flight(
            INSTALLS, location_id, lambda: self._mint_now(company_id, location_id, base, source)
        )
        return await asyncio.shield(task)

    async def _mint_now(
        self, company_id: str, location_id: str, base: dict[str, Any] | None, source: str
    ) -> str:
        tombstone = self.state.get(UNINSTALLS, location_id)
        answer = await self._mint_request(company_id, location_id)
        now = time.time()
        pair = _pair_from_answer(answer, now)
        if self.state.get(UNINSTALLS, location_id) != tombstone or (
            self.state.get(COMPANIES, company_id) is None
        ):
            # An UNINSTALL (of the location or its company) was stored while we minted: GHL's
            # answer predates it, and installing now would undo it.
            raise Uninstalled(location_id, "uninstalled while minting")
        current = self.state.get(INSTALLS, location_id)
        if not _same_generation(current, base):
            log.info(
                "location=%s was reinstalled while minting; keeping the newer pair", location_id
            )
            if _usable(current):
                return await self._durable(current["access_token"])
            raise TokenUnavailable(location_id, "changed while minting", retryable=True)
        record = {**pair, "company_id": company_id, "installed_at": now, "source": source}
        await self._store(INSTALLS, location_id, record, rollback=True)
        log.info(
            "installed location=%s company=%s (agency token, %s)",
            location_id,
            company_id,
            source,
            extra={"location_id": location_id, "outcome": "installed", "reason": source},
        )
        return pair["access_token"]

    async def _mint_request(self, company_id: str, location_id: str) -> dict[str, Any]:
        """`POST /oauth/locationToken`, paced per company (GHLClient's limiter), a 401 refreshing
        the company token once per attempt (`refresh_once_on_401`), 429/5xx/timeouts retried for
        `MINT_RETRY_SECONDS`."""
        deadline = time.monotonic() + MINT_RETRY_SECONDS
        attempt = 0
        while True:
            try:
                return await refresh_once_on_401(
                    lambda: self._company_token(company_id),
                    lambda token: self.ghl.location_token(token, company_id, location_id),
                    lambda rejected: self._refresh(COMPANIES, company_id, rejected),
                )
            except GHLError as e:
                if not e.retryable:
                    raise
                delay = retry_delay(attempt, e.retry_after, base=1.0, cap=30.0)
                if time.monotonic() + delay > deadline or self._stopping_since is not None:
                    raise
                log.info(
                    "mint location=%s company=%s: GHL %d; retrying in %.1fs",
                    location_id,
                    company_id,
                    e.status,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _keep_pending(
        self, location_id: str, company_id: str, event_at: float | None
    ) -> None:
        """Durably remember an INSTALL that is not complete yet (OSError if it cannot be)."""
        previous = self.state.get(PENDING, location_id) or {}
        record = {
            "company_id": company_id or previous.get("company_id", ""),
            "event_at": event_at if event_at is not None else previous.get("event_at"),
            "received_at": previous.get("received_at", time.time()),
        }
        if record != previous:
            await self._put_and_commit(PENDING, location_id, record)

    async def on_install_webhook(
        self, location_id: str, company_id: str, event_at: float | None
    ) -> str:
        """GHL's INSTALL app webhook. Returns what was done; OSError if it could not be kept.

        Completed at once when we hold the company's token and the mint succeeds; otherwise kept
        durably (before this returns) and completed by a reconciliation or the OAuth callback.
        """
        if not location_id:
            if company_id and self.state.get(COMPANIES, company_id) is not None:
                self.request_reconcile()
                return "company install; reconciling"
            return "company install; completed when the agency token arrives"
        tombstone = self.state.get(UNINSTALLS, location_id)
        if tombstone is not None and event_at is not None and event_at < tombstone["at"]:
            return "older than the location's last UNINSTALL; ignored"
        if _usable(self.state.get(INSTALLS, location_id)):
            return "already installed"
        await self._keep_pending(location_id, company_id, event_at)
        if company_id and self.state.get(COMPANIES, company_id) is not None:
            try:
                await self.mint_location(company_id, location_id, SOURCE_AGENCY)
                return "installed with the agency token"
            except (GHLError, TokenUnavailable) as e:
                log.warning(
                    "INSTALL location=%s: mint failed (%s); kept, retried by reconciliation",
                    location_id,
                    e,
                    extra={"location_id": location_id, "outcome": "pending", "reason": str(e)},
                )
        self.request_reconcile()
        return "kept; completed by the OAuth callback or the next reconciliation"

    async def uninstall(
        self,
        location_id: str = "",
        company_id: str = "",
        event_at: float | None = None,
        webhook_id: str = "",
    ) -> list[str]:
        """Forget a location, or a company and every location installed through it, unless the
        pair is newer than the UNINSTALL (see the module docstring: ordering)."""
        if event_at is not None:
            # Nothing happened after we heard of it: a timestamp ahead of our clock (GHL's skew,
            # or a bad value) must not make a tombstone that outlives TOMBSTONE_AGE or outranks
            # the next reinstall.
            event_at = min(event_at, time.time())
        if event_at is None and webhook_id:
            # Dated by its first delivery, remembered in the state file: a retry of it after a
            # restart and a reinstall is older than the reinstall, so it deletes nothing.
            first = self.state.get(WEBHOOKS, webhook_id)
            event_at = first["at"] if first is not None else time.time()
            if first is None:
                self.state.put(WEBHOOKS, webhook_id, {"at": event_at})
        if event_at is None:
            log.warning(
                "UNINSTALL location=%s company=%s without timestamp or webhookId: it cannot be "
                "ordered against a reinstall, so no pair is deleted",
                location_id or "-",
                company_id or "-",
            )

        def older(record: dict[str, Any]) -> bool:
            return event_at is not None and record.get("installed_at", 0.0) <= event_at

        removed = []
        targets: list[str] = []
        if location_id:
            targets = [location_id]
        elif company_id:
            company = self.state.get(COMPANIES, company_id)
            if company is not None and older(company):
                self.state.delete(COMPANIES, company_id)
            targets = [
                lid for lid, r in self.state.items(INSTALLS) if r.get("company_id") == company_id
            ]
            targets += [
                lid for lid, p in self.state.items(PENDING) if p.get("company_id") == company_id
            ]
        for lid in dict.fromkeys(targets):
            record = self.state.get(INSTALLS, lid)
            if record is not None and not older(record):
                log.info(
                    "UNINSTALL location=%s is older than its install; tokens kept",
                    lid,
                    extra={"location_id": lid, "outcome": "ignored", "reason": "stale uninstall"},
                )
                continue
            pending = self.state.get(PENDING, lid)
            if pending is not None and (
                event_at is None or (pending.get("event_at") or 0) <= event_at
            ):
                self.state.delete(PENDING, lid)
            if event_at is not None:
                tombstone = self.state.get(UNINSTALLS, lid)
                if tombstone is None or tombstone["at"] < event_at:
                    self.state.put(UNINSTALLS, lid, {"at": event_at})
            if record is not None:
                self.state.delete(INSTALLS, lid)
                removed.append(lid)
        await self.state.commit()
        for lid in removed:
            log.info(
                "uninstalled location=%s",
                lid,
                extra={"location_id": lid, "outcome": "uninstalled"},
            )
        return removed

    # -- reconciliation ------------------------------------------------------------------------

    def request_reconcile(self) -> None:
        """Run a reconciliation soon (in the background); one more after a running one."""
        if self._stopping_since is not None:
            return
        if self._reconcile_task is not None and not self._reconcile_task.done():
            self._reconcile_again = True
            return
        self._reconcile_task = asyncio.ensure_future(self._reconcile_in_background())

    async def _reconcile_in_background(self) -> None:
        while True:
            self._reconcile_again = False
            try:
                await self.reconcile()
            except Exception:
                log.exception(
                    "reconciliation failed; next one in %.0fs",
                    self.config.tokens.reconcile_interval,
                )
            if not self._reconcile_again or self._stopping_since is not None:
                return

    async def reconcile(self) -> dict[str, Any]:
        """Compare every company's installed locations at GHL with ours; mint and mark.

        Returns ``{"minted": [...], "marked": [...], "failed": {location: reason},
        "companies": {company: error}}`` (companies whose list could not be read: nothing of
        theirs is marked on a list we could not read completely).
        """
        report: dict[str, Any] = {"minted": [], "marked": [], "failed": {}, "companies": {}}
        for company_id, company in self.state.items(COMPANIES):
            if company.get("status") == STATUS_NEEDS_REAUTH:
                report["companies"][company_id] = "agency token needs reauthorisation"
                continue
            asked_at = time.time()
            try:
                listed = await self._installed_locations(company_id)
            except (GHLError, TokenUnavailable) as e:
                report["companies"][company_id] = str(e)
                log.warning(
                    "reconcile company=%s: cannot read GHL's installed locations: %s",
                    company_id,
                    e,
                    extra={"company_id": company_id, "outcome": "failed", "reason": str(e)},
                )
                continue
            await self._reconcile_company(company_id, listed, asked_at, report)
        await self._expire_pending()
        if report["minted"] or report["marked"] or report["failed"]:
            log.info(
                "reconciliation: minted=%d marked_uninstalled=%d failed=%d",
                len(report["minted"]),
                len(report["marked"]),
                len(report["failed"]),
            )
        return report

    async def _installed_locations(self, company_id: str) -> list[str]:
        return await refresh_once_on_401(
            lambda: self._company_token(company_id),
            lambda token: self.ghl.installed_locations(token, company_id),
            lambda rejected: self._refresh(COMPANIES, company_id, rejected),
        )

    async def _reconcile_company(
        self, company_id: str, listed: list[str], asked_at: float, report: dict[str, Any]
    ) -> None:
        """Mint what `listed` (GHL's answer to a request made at `asked_at`) has and we lack;
        mark what we hold and it lacks, unless it was installed after the request was made (the
        list may predate it)."""
        listed_set = set(listed)
        ours = [
            lid
            for lid, r in self.state.items(INSTALLS)
            if r.get("company_id") == company_id and _usable(r)
        ]
        if not listed and ours:
            # More likely a wrong ghl.app_id than every location uninstalled at once (the agency
            # UNINSTALL webhook would say so): never stop texting on an empty list.
            report["companies"][company_id] = "GHL lists no installed location; nothing marked"
            log.warning(
                "reconcile company=%s: GHL lists no location with app %s installed, we hold %d; "
                "marking nothing (check ghl.app_id)",
                company_id,
                self.config.ghl.app_id,
                len(ours),
                extra={"company_id": company_id, "outcome": "skipped", "reason": "empty list"},
            )
            return
        marked = []
        for location_id, record in self.state.items(INSTALLS):
            if record.get("company_id") != company_id or location_id in listed_set:
                continue
            if record.get("installed_at", 0.0) >= asked_at:
                continue
            if record.get("status") != STATUS_UNINSTALLED:
                self.state.put(INSTALLS, location_id, {**record, "status": STATUS_UNINSTALLED})
                marked.append(location_id)
        if marked:
            await self.state.commit()
            for location_id in marked:
                log.warning(
                    "location=%s is no longer installed at GHL (company=%s); not texted for "
                    "until it is installed again",
                    location_id,
                    company_id,
                    extra={"location_id": location_id, "outcome": "marked_uninstalled"},
                )
            report["marked"] += marked
        to_mint = []
        for location_id in listed:
            record = self.state.get(INSTALLS, location_id)
            if record is None or record.get("status") in (STATUS_UNINSTALLED, STATUS_NEEDS_REAUTH):
                to_mint.append(location_id)
            elif self.state.get(PENDING, location_id) is not None:
                self.state.delete(PENDING, location_id)
        minted, failed = await self._mint_many(company_id, to_mint, SOURCE_RECONCILED)
        report["minted"] += minted
        report["failed"].update(failed)

    async def _expire_pending(self) -> None:
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
        horizon = time.time() - TOMBSTONE_AGE
        for section in (UNINSTALLS, WEBHOOKS):
            for key, tombstone in self.state.items(section):
                if tombstone["at"] < horizon:
                    self.state.delete(section, key)
        if self.state.dirty:
            await self.state.commit()

    # -- tokens for callers -------------------------------------------------------------------

    async def access_token(self, location_id: str) -> str:
        """A durable, unexpired access token for the location (refreshing it if needed)."""
        record = self.get(location_id)
        if record is None:
            raise TokenUnavailable(location_id, "not installed")
        if record.get("status") == STATUS_NEEDS_REAUTH:
            raise TokenUnavailable(location_id, "needs reauthorisation (reinstall the app)")
        if record["expires_at"] - time.time() < EXPIRY_SLACK:
            return await self._refresh(INSTALLS, location_id)
        return await self._durable(record["access_token"])

    async def refresh_after_401(self, location_id: str, rejected_token: str) -> str:
        return await self._refresh(INSTALLS, location_id, rejected_token)

    async def _company_token(self, company_id: str) -> str:
        record = self.state.get(COMPANIES, company_id)
        if record is None:
            raise TokenUnavailable(company_id, "no agency token for this company")
        if record.get("status") == STATUS_NEEDS_REAUTH:
            raise TokenUnavailable(company_id, "agency token needs reauthorisation")
        if record["expires_at"] - time.time() < EXPIRY_SLACK:
            return await self._refresh(COMPANIES, company_id)
        return await self._durable(record["access_token"])

    async def _durable(self, token: str) -> str:
        """`token`, once the state is on disk: the pair in memory may be one whose commit failed,
        and a pair is never used before it is durable (its refresh token is single-use)."""
        if self.state.dirty:
            await self.state.commit()
        return token

    # -- refresh ------------------------------------------------------------------------------

    async def _refresh(self, section: str, key: str, rejected_token: str | None = None) -> str:
        """Single-flight refresh of one pair; the new access token once it is on disk."""
        if (section, key) not in self._in_flight:
            record = self.state.get(section, key)
            if record is None:
                raise TokenUnavailable(key, "not installed")
            if rejected_token is not None and record["access_token"] != rejected_token:
                # Someone refreshed it since the caller read it.
                return await self._durable(record["access_token"])
        task = self._flight(section, key, lambda: self._refresh_now(section, key))
        return await asyncio.shield(task)

    async def _refresh_now(self, section: str, key: str) -> str:
        record = self.state.get(section, key)
        if record is None:
            raise TokenUnavailable(key, "uninstalled")
        if record.get("status") == STATUS_NEEDS_REAUTH:
            raise TokenUnavailable(key, "needs reauthorisation (reinstall the app)")
        user_type = "Company" if section == COMPANIES else "Location"
        try:
            answer = await self.ghl.refresh_token(record["refresh_token"], user_type)
            pair = _pair_from_answer(answer, time.time())
        except GHLError as e:
            if section == INSTALLS and _is_invalid_grant(e) and self._can_remint(record):
                try:
                    return await self._remint(key, record)
                except (GHLError, TokenUnavailable) as mint_error:
                    log.warning(
                        "re-mint location=%s failed: %s",
                        key,
                        mint_error,
                        extra={"location_id": key, "outcome": "remint_failed"},
                    )
            await self._refresh_failed(section, key, record, e)
            raise TokenUnavailable(key, f"refresh failed: {e.message}", e.retryable) from None
        current = self.state.get(section, key)
        if not _same_generation(current, record):
            # Uninstalled, reinstalled or re-minted while the refresh was in flight: the newer
            # record wins; this answer is dropped.
            log.info(
                "refresh answer for %s=%s dropped: the record was replaced meanwhile",
                "location" if section == INSTALLS else "company",
                key,
                extra={"location_id": key, "outcome": "dropped", "reason": "replaced"},
            )
            if current is None or not _usable(current):
                raise TokenUnavailable(key, "uninstalled or replaced during refresh")
            return await self._durable(current["access_token"])
        assert current is not None
        refreshed = {**current, **pair}
        if current.get("status") == STATUS_UNINSTALLED:  # marked meanwhile: stays marked
            refreshed["status"] = STATUS_UNINSTALLED
        await self._store(section, key, refreshed)
        self.metrics.token_refreshes.labels("ok").inc()
        log.info(
            "refreshed token %s=%s",
            "location" if section == INSTALLS else "company",
            key,
            extra={"location_id": key, "outcome": "refreshed"},
        )
        return pair["access_token"]

    def _can_remint(self, record: dict[str, Any]) -> bool:
        company = self.state.get(COMPANIES, record.get("company_id") or "")
        return company is not None and company.get("status") != STATUS_NEEDS_REAUTH

    async def _remint(self, location_id: str, record: dict[str, Any]) -> str:
        company_id = record["company_id"]
        log.warning(
            "location=%s refresh token rejected (invalid_grant); minting a new pair with the "
            "agency token of company=%s",
            location_id,
            company_id,
            extra={"location_id": location_id, "outcome": "remint", "reason": "invalid_grant"},
        )
        source = record.get("source") or SOURCE_AGENCY
        token = await self._mint_now(company_id, location_id, record, source)
        self.metrics.token_refreshes.labels("reminted").inc()
        return token

    async def _refresh_failed(
        self, section: str, key: str, refreshed: dict[str, Any], error: GHLError
    ) -> None:
        current = self.state.get(section, key)
        what = "location" if section == INSTALLS else "company"
        text = f"{error.oauth_error} {error.message}".lower()
        if current is None or not _same_generation(current, refreshed):
            return  # replaced meanwhile: this failure says nothing about the new pair
        if error.status in (400, 401) and "not active" in text:
            outcome = STATUS_INACTIVE
            if current.get("status") != STATUS_INACTIVE:
                log.warning(
                    "%s=%s is not active at GHL; keeping its tokens, will retry",
                    what,
                    key,
                    extra={"location_id": key, "outcome": STATUS_INACTIVE, "reason": "not active"},
                )
            await self._store(section, key, {**current, "status": STATUS_INACTIVE})
        elif _is_invalid_grant(error):
            outcome = STATUS_NEEDS_REAUTH
            log.error(
                "%s=%s refresh token rejected (invalid_grant): the app must be reinstalled for it",
                what,
                key,
                extra={
                    "location_id": key,
                    "outcome": STATUS_NEEDS_REAUTH,
                    "reason": "invalid_grant",
                },
            )
            await self._store(section, key, {**current, "status": STATUS_NEEDS_REAUTH})
        else:
            outcome = "error"
            log.warning(
                "refresh %s=%s failed (will retry): %s",
                what,
                key,
                error,
                extra={"location_id": key, "outcome": "refresh_failed", "reason": error.message},
            )
        self.metrics.token_refreshes.labels(outcome).inc()

    def _due(self, now: float) -> list[tuple[float, str, str]]:
        horizon = now + self.config.tokens.refresh_margin
        due = []
        for section in (COMPANIES, INSTALLS):
            for key, record in self.state.items(section):
                if record.get("status") in (STATUS_NEEDS_REAUTH, STATUS_UNINSTALLED):
                    continue
                if record["expires_at"] < horizon or record.get("status") == STATUS_INACTIVE:
                    due.append((record["expires_at"], section, key))
        due.sort()
        return due

    async def refresh_due(self) -> int:
        """One sweep: refresh every pair expiring within the margin; returns how many succeeded."""
        due = self._due(time.time())
        if due:
            log.info("token sweep: %d pair(s) due", len(due))
        queue = list(due)
        refreshed = 0

        async def worker() -> None:
            nonlocal refreshed
            while queue:
                _, section, key = queue.pop(0)
                await self._limiter.acquire()
                try:
                    await self._refresh(section, key)
                    refreshed += 1
                except TokenUnavailable:
                    pass  # logged and recorded by _refresh_failed

        await asyncio.gather(*(worker() for _ in range(min(SWEEP_CONCURRENCY, len(queue)))))
        return refreshed

    async def _sweep_forever(self) -> None:
        interval = self.config.tokens.refresh_interval
        while True:
            try:
                await self.refresh_due()
            except Exception:
                log.exception("token sweep failed; next sweep in %.0fs", interval)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def _reconcile_forever(self) -> None:
        interval = self.config.tokens.reconcile_interval
        while True:
            if self.state.count(COMPANIES) or self.state.count(PENDING):
                self.request_reconcile()
            else:  # direct installs only: no reconciliation, but old tombstones still expire
                try:
                    await self._expire_pending()
                except OSError as e:
                    log.warning("cannot expire old UNINSTALL records now: %s", e.strerror)
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))

    async def start(self) -> None:
        self._sweep_task = asyncio.ensure_future(self._sweep_forever())
        self._reconcile_loop_task = asyncio.ensure_future(self._reconcile_forever())

    def begin_stop(self) -> None:
        """From now on no refresh or mint starts (callers get a retryable TokenUnavailable)."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()

    async def stop(self) -> None:
        self.begin_stop()
        for task in (self._sweep_task, self._reconcile_loop_task, self._reconcile_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        # Let refreshes and code exchanges whose answers may be on the way finish storing them.
        waiting = [*self._in_flight.values(), *self._exchanges]
        if waiting:
            assert self._stopping_since is not None
            wait = self._stopping_since + REFRESH_STOP_WAIT - time.monotonic()
            await asyncio.wait(waiting, timeout=max(0.1, wait))
        for task in list(self._exchanges):
            task.cancel()
            log.error(
                "stopping: no answer yet to an OAuth code exchange; if GHL spent the code, the "
                "location must install again",
                extra={"outcome": "abandoned", "reason": "shutdown"},
            )
        # The state store closes after this: an answer arriving later could not be stored.
        for (section, key), task in list(self._in_flight.items()):
            task.cancel()
            log.error(
                "stopping: no answer yet to the token request for %s=%s; if GHL spent its "
                "refresh token, the location needs a re-mint or a reinstall",
                "location" if section == INSTALLS else "company",
                key,
                extra={"location_id": key, "outcome": "abandoned", "reason": "shutdown"},
            )

"""Installations and their OAuth token pairs: install, agency installs, refresh, uninstall.

The token store is the most precious state the daemon has: losing a refresh token means the
customer must reinstall. Guarantees:

- A token pair GHL hands us (code exchange, refresh, location token) is `put` into the state store
  and committed (fsynced) with no other await in between; nothing uses a new access token before
  that commit has returned. The one window in which a crash loses a pair is unavoidable: between
  GHL's answer arriving and the fsync of the file that holds it. After that, the pair survives.
- GHL refresh tokens are single-use, so refreshes are single-flight per location (and per
  company): every caller that needs a refresh while one is in flight waits for that one. A refresh
  runs as its own task, so a cancelled caller never abandons a refresh whose answer must be stored.
- `invalid_grant` marks the location `needs_reauth` (logged as an error once, kept for
  `castghld installs` and the metric) and it is not refreshed again until it is reinstalled.
  "Location is not active" marks it `inactive`, keeps the tokens and retries on later sweeps.
- A sweep at startup and every `tokens.refresh_interval` (with jitter) refreshes every pair that
  expires within `tokens.refresh_margin`, at most `REFRESHES_PER_SECOND` a second, soonest first.

Records (JSON, in state sections ``installs`` by location id and ``companies`` by company id):
``access_token, refresh_token, expires_at (epoch s), status, company_id, scope, installed_at,
refreshed_at`` (+ ``approved_locations`` for companies).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from castghld.config import Config
from castghld.ghl import GHLClient, GHLError, TokenUnavailable
from castghld.metrics import Metrics
from castghld.pacing import SlidingWindowLimiter
from castghld.state import StateStore

log = logging.getLogger("castghld.tokens")

INSTALLS = "installs"
COMPANIES = "companies"
STATUS_OK = "ok"
STATUS_NEEDS_REAUTH = "needs_reauth"
STATUS_INACTIVE = "inactive"
REFRESHES_PER_SECOND = 10
SWEEP_CONCURRENCY = 8
MINT_CONCURRENCY = 8
# At shutdown no new refresh starts; one already sent may have spent its single-use refresh token
# at GHL, so its answer must be stored: we wait for it up to this long after the stop began
# (longer than the HTTP request timeout, so such a refresh has either an answer or an error).
REFRESH_STOP_WAIT = 12.0
EXPIRY_SLACK = 120.0  # a token expiring sooner than this is refreshed before use


def _pair_from_answer(answer: dict[str, Any], now: float) -> dict[str, Any]:
    try:
        access, refresh = answer["access_token"], answer["refresh_token"]
        expires_in = float(answer.get("expires_in") or 86399)
    except (KeyError, TypeError, ValueError):
        raise GHLError(502, "GHL's token answer lacks access_token/refresh_token") from None
    if not isinstance(access, str) or not isinstance(refresh, str) or not access or not refresh:
        raise GHLError(502, "GHL's token answer has empty tokens")
    return {
        "access_token": access,
        "refresh_token": refresh,
        "expires_at": now + expires_in,
        "scope": answer.get("scope", ""),
        "status": STATUS_OK,
        "refreshed_at": now,
    }


class Installations:
    def __init__(self, config: Config, state: StateStore, ghl: GHLClient, metrics: Metrics):
        self.config = config
        self.state = state
        self.ghl = ghl
        self.metrics = metrics
        self._in_flight: dict[tuple[str, str], asyncio.Task] = {}
        self._sweep_task: asyncio.Task | None = None
        self._limiter = SlidingWindowLimiter(REFRESHES_PER_SECOND, 1.0)
        # Called with a location id once its pair is on disk and usable (install, reinstall,
        # recovery from inactive): work that waited for the location can go on.
        self.on_usable: list[Callable[[str], None]] = []
        self._stopping_since: float | None = None
        metrics.before_scrape.append(self.update_metrics)

    # -- lookups -------------------------------------------------------------------------------

    def get(self, location_id: str) -> dict[str, Any] | None:
        return self.state.get(INSTALLS, location_id)

    def location_ids(self) -> list[str]:
        return [location_id for location_id, _ in self.state.items(INSTALLS)]

    def update_metrics(self) -> None:
        """Set the installation gauges (run on each /metrics scrape, not on every change)."""
        counts = {STATUS_OK: 0, STATUS_NEEDS_REAUTH: 0, STATUS_INACTIVE: 0}
        for _, record in self.state.items(INSTALLS):
            status = record.get("status", STATUS_OK)
            counts[status] = counts.get(status, 0) + 1
        for status, n in counts.items():
            self.metrics.installations.labels(status).set(n)

    # -- storing pairs (the crash window lives here) ------------------------------------------

    async def _store(self, section: str, key: str, record: dict[str, Any]) -> None:
        """Put and fsync `record`. Callers reach here straight from GHL's answer, with no other
        await in between: that is the whole of the window in which a crash loses a pair."""
        previous = self.state.get(section, key)
        self.state.put(section, key, record)
        await self.state.commit()
        was_usable = previous is not None and previous.get("status", STATUS_OK) == STATUS_OK
        usable = record.get("status", STATUS_OK) == STATUS_OK
        if section == INSTALLS and usable and not was_usable:
            for callback in self.on_usable:
                callback(key)

    # -- install ------------------------------------------------------------------------------

    async def install_from_code(self, code: str) -> dict[str, Any]:
        """Exchange an OAuth code; store the pair(s) durably. Returns what was installed:
        ``{"locations": [...], "company_id": ..., "failed": {location_id: reason}}``."""
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
            )
            log.info("agency install company=%s locations=%d", company_id, len(approved))
            failed: dict[str, str] = {}
            installed: list[str] = []
            queue = list(approved)

            # A few mints at a time: their state commits coalesce into one write per round, so
            # a bulk install of hundreds of locations answers in seconds, not minutes.
            async def mint_worker() -> None:
                while queue:
                    location_id = queue.pop(0)
                    try:
                        await self.mint_location(company_id, location_id)
                        installed.append(location_id)
                    except (GHLError, TokenUnavailable) as e:
                        failed[location_id] = str(e)
                        log.error(
                            "minting token failed company=%s location=%s: %s",
                            company_id,
                            location_id,
                            e,
                        )

            workers = min(MINT_CONCURRENCY, len(queue))
            await asyncio.gather(*(mint_worker() for _ in range(workers)))
            installed.sort(key=approved.index)
            return {"locations": installed, "company_id": company_id, "failed": failed}
        location_id = str(answer.get("locationId") or "")
        if not location_id:
            raise GHLError(502, "GHL's token answer has no locationId")
        await self._store(
            INSTALLS, location_id, {**pair, "company_id": company_id, "installed_at": now}
        )
        log.info("installed location=%s company=%s", location_id, company_id or "-")
        return {"locations": [location_id], "company_id": company_id, "failed": {}}

    async def mint_location(self, company_id: str, location_id: str) -> None:
        """Get and store a location pair with the company's token (`/oauth/locationToken`)."""
        company_token = await self._company_token(company_id)
        try:
            answer = await self.ghl.location_token(company_token, company_id, location_id)
        except GHLError as e:
            if e.status != 401:
                raise
            company_token = await self._refresh(COMPANIES, company_id, company_token)
            answer = await self.ghl.location_token(company_token, company_id, location_id)
        now = time.time()
        pair = _pair_from_answer(answer, now)
        await self._store(
            INSTALLS, location_id, {**pair, "company_id": company_id, "installed_at": now}
        )
        log.info("installed location=%s company=%s (agency token)", location_id, company_id)

    async def on_install_webhook(self, location_id: str, company_id: str) -> str:
        """GHL's INSTALL app webhook: mint the location's pair when we hold its company's."""
        record = self.get(location_id)
        if record is not None and record.get("status") == STATUS_OK:
            return "already installed"
        if company_id and self.state.get(COMPANIES, company_id) is not None:
            await self.mint_location(company_id, location_id)
            return "installed with the agency token"
        return "no agency token; waiting for the OAuth callback"

    async def uninstall(self, location_id: str = "", company_id: str = "") -> list[str]:
        """Forget a location, or a company and every location installed through it."""
        removed = []
        if location_id:
            if self.state.delete(INSTALLS, location_id):
                removed.append(location_id)
        elif company_id:
            self.state.delete(COMPANIES, company_id)
            for lid, record in self.state.items(INSTALLS):
                if record.get("company_id") == company_id:
                    self.state.delete(INSTALLS, lid)
                    removed.append(lid)
        await self.state.commit()
        for lid in removed:
            log.info("uninstalled location=%s", lid)
        return removed

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
        flight = (section, key)
        task = self._in_flight.get(flight)
        if task is None:
            record = self.state.get(section, key)
            if record is None:
                raise TokenUnavailable(key, "not installed")
            if rejected_token is not None and record["access_token"] != rejected_token:
                # Someone refreshed it since the caller read it.
                return await self._durable(record["access_token"])
            if self._stopping_since is not None:
                raise TokenUnavailable(key, "castghld is stopping", retryable=True)
            task = asyncio.ensure_future(self._refresh_now(section, key))
            self._in_flight[flight] = task
            task.add_done_callback(lambda _: self._in_flight.pop(flight, None))
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
            await self._refresh_failed(section, key, e)
            raise TokenUnavailable(key, f"refresh failed: {e.message}", e.retryable) from None
        current = self.state.get(section, key)
        if current is None:  # uninstalled while the refresh was in flight
            raise TokenUnavailable(key, "uninstalled")
        await self._store(section, key, {**current, **pair})
        self.metrics.token_refreshes.labels("ok").inc()
        log.info("refreshed token %s=%s", "location" if section == INSTALLS else "company", key)
        return pair["access_token"]

    async def _refresh_failed(self, section: str, key: str, error: GHLError) -> None:
        current = self.state.get(section, key)
        what = "location" if section == INSTALLS else "company"
        text = f"{error.oauth_error} {error.message}".lower()
        if current is None:
            return
        if error.status in (400, 401) and "not active" in text:
            outcome = STATUS_INACTIVE
            if current.get("status") != STATUS_INACTIVE:
                log.warning("%s=%s is not active at GHL; keeping its tokens, will retry", what, key)
            await self._store(section, key, {**current, "status": STATUS_INACTIVE})
        elif error.status in (400, 401) and "invalid_grant" in text:
            outcome = STATUS_NEEDS_REAUTH
            log.error(
                "%s=%s refresh token rejected (invalid_grant): the app must be reinstalled for it",
                what,
                key,
            )
            await self._store(section, key, {**current, "status": STATUS_NEEDS_REAUTH})
        else:
            outcome = "error"
            log.warning("refresh %s=%s failed (will retry): %s", what, key, error)
        self.metrics.token_refreshes.labels(outcome).inc()

    def _due(self, now: float) -> list[tuple[float, str, str]]:
        horizon = now + self.config.tokens.refresh_margin
        due = []
        for section in (COMPANIES, INSTALLS):
            for key, record in self.state.items(section):
                if record.get("status") == STATUS_NEEDS_REAUTH:
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

    async def start(self) -> None:
        self._sweep_task = asyncio.ensure_future(self._sweep_forever())

    def begin_stop(self) -> None:
        """From now on no refresh starts (callers get a retryable TokenUnavailable)."""
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()

    async def stop(self) -> None:
        self.begin_stop()
        if self._sweep_task is not None:
            self._sweep_task.cancel()
            try:
                await self._sweep_task
            except asyncio.CancelledError:
                pass
        # Let refreshes whose answers may be on the way finish storing them.
        if self._in_flight:
            assert self._stopping_since is not None
            wait = self._stopping_since + REFRESH_STOP_WAIT - time.monotonic()
            await asyncio.wait(list(self._in_flight.values()), timeout=max(0.1, wait))

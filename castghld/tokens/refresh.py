"""Access tokens for callers, refresh, re-mint, and the refresh sweep.

Guarantees:

- A caller gets an access token only once its pair is on disk, refreshed first if it expires
  within `EXPIRY_SLACK`; refreshes are single flight per pair (`flight.py`), and an answer is
  stored only if the record is still the one the refresh was made for.
- A location pair from an agency token that gets ``invalid_grant`` is re-minted with the company
  token before the location is marked ``needs_reauth``.
- `invalid_grant` otherwise marks the location ``needs_reauth`` (logged as an error once) and it is
  not refreshed again until it is reinstalled. "Location is not active" marks it ``inactive``,
  keeps the tokens and retries on later sweeps.
- A sweep at startup and every `tokens.refresh_interval` (with jitter) refreshes every pair that
  expires within `tokens.refresh_margin`, at most `REFRESHES_PER_SECOND` a second, soonest first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from castghld.ghl import GHLClient, GHLError, TokenUnavailable
from castghld.metrics import Metrics
from castghld.pacing import SlidingWindowLimiter
from castghld.tokens.flight import SingleFlight, same_generation
from castghld.tokens.store import (
    COMPANIES,
    INSTALLS,
    SOURCE_AGENCY,
    STATUS_INACTIVE,
    STATUS_NEEDS_REAUTH,
    STATUS_UNINSTALLED,
    InstallStore,
    log,
    pair_from_answer,
    usable,
)

REFRESHES_PER_SECOND = 10
SWEEP_CONCURRENCY = 8
EXPIRY_SLACK = 120.0  # a token expiring sooner than this is refreshed before use

# (company_id, location_id, the record it replaces, source) -> the new access token, once stored
MintNow = Callable[[str, str, dict[str, Any] | None, str], Awaitable[str]]


def is_invalid_grant(error: GHLError) -> bool:
    text = f"{error.oauth_error} {error.message}".lower()
    return error.status in (400, 401) and "invalid_grant" in text


class Refresher:
    """Access tokens of locations and companies, kept fresh (see the module docstring)."""

    def __init__(
        self, store: InstallStore, flights: SingleFlight, ghl: GHLClient, metrics: Metrics
    ):
        self.store = store
        self.state = store.state
        self.flights = flights
        self.ghl = ghl
        self.metrics = metrics
        self.limiter = SlidingWindowLimiter(REFRESHES_PER_SECOND, 1.0)
        # The agency mint (`agency.Minter.mint_now`), set by `Installations`: the minter needs
        # this refresher for its company tokens, so it is made after it.
        self.mint_now: MintNow | None = None

    # -- tokens for callers -------------------------------------------------------------------

    async def access_token(self, location_id: str) -> str:
        """A durable, unexpired access token for the location (refreshing it if needed)."""
        record = self.store.get(location_id)
        if record is None:
            raise TokenUnavailable(location_id, "not installed")
        if record.get("status") == STATUS_NEEDS_REAUTH:
            raise TokenUnavailable(location_id, "needs reauthorisation (reinstall the app)")
        if record["expires_at"] - time.time() < EXPIRY_SLACK:
            return await self.refresh(INSTALLS, location_id)
        return await self.store.durable(record["access_token"])

    async def refresh_after_401(self, location_id: str, rejected_token: str) -> str:
        return await self.refresh(INSTALLS, location_id, rejected_token)

    async def company_token(self, company_id: str) -> str:
        record = self.state.get(COMPANIES, company_id)
        if record is None:
            raise TokenUnavailable(company_id, "no agency token for this company")
        if record.get("status") == STATUS_NEEDS_REAUTH:
            raise TokenUnavailable(company_id, "agency token needs reauthorisation")
        if record["expires_at"] - time.time() < EXPIRY_SLACK:
            return await self.refresh(COMPANIES, company_id)
        return await self.store.durable(record["access_token"])

    # -- refresh ------------------------------------------------------------------------------

    async def refresh(self, section: str, key: str, rejected_token: str | None = None) -> str:
        """Single-flight refresh of one pair; the new access token once it is on disk."""
        if self.flights.get(section, key) is None:
            record = self.state.get(section, key)
            if record is None:
                raise TokenUnavailable(key, "not installed")
            if rejected_token is not None and record["access_token"] != rejected_token:
                # Someone refreshed it since the caller read it.
                return await self.store.durable(record["access_token"])
        task = self.flights.join(section, key, lambda: self._refresh_now(section, key))
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
            pair = pair_from_answer(answer, time.time())
        except GHLError as e:
            if section == INSTALLS and is_invalid_grant(e) and self._can_remint(record):
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
        if not same_generation(current, record):
            # Uninstalled, reinstalled or re-minted while the refresh was in flight: the newer
            # record wins; this answer is dropped.
            log.info(
                "refresh answer for %s=%s dropped: the record was replaced meanwhile",
                "location" if section == INSTALLS else "company",
                key,
                extra={"location_id": key, "outcome": "dropped", "reason": "replaced"},
            )
            if current is None or not usable(current):
                raise TokenUnavailable(key, "uninstalled or replaced during refresh")
            return await self.store.durable(current["access_token"])
        assert current is not None
        refreshed = {**current, **pair}
        if current.get("status") == STATUS_UNINSTALLED:  # marked meanwhile: stays marked
            refreshed["status"] = STATUS_UNINSTALLED
        await self.store.store(section, key, refreshed)
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
        return (
            self.mint_now is not None
            and company is not None
            and company.get("status") != STATUS_NEEDS_REAUTH
        )

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
        assert self.mint_now is not None  # checked by _can_remint
        token = await self.mint_now(company_id, location_id, record, source)
        self.metrics.token_refreshes.labels("reminted").inc()
        return token

    async def _refresh_failed(
        self, section: str, key: str, refreshed: dict[str, Any], error: GHLError
    ) -> None:
        current = self.state.get(section, key)
        what = "location" if section == INSTALLS else "company"
        text = f"{error.oauth_error} {error.message}".lower()
        if current is None or not same_generation(current, refreshed):
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
            await self.store.store(section, key, {**current, "status": STATUS_INACTIVE})
        elif is_invalid_grant(error):
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
            await self.store.store(section, key, {**current, "status": STATUS_NEEDS_REAUTH})
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

    # -- the sweep ----------------------------------------------------------------------------

    def _due(self, now: float) -> list[tuple[float, str, str]]:
        horizon = now + self.store.config.tokens.refresh_margin
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
                await self.limiter.acquire()
                try:
                    await self.refresh(section, key)
                    refreshed += 1
                except TokenUnavailable:
                    pass  # logged and recorded by _refresh_failed

        await asyncio.gather(*(worker() for _ in range(min(SWEEP_CONCURRENCY, len(queue)))))
        return refreshed

    async def sweep_forever(self) -> None:
        """A sweep every `tokens.refresh_interval` (read at each wait: a reload applies it)."""
        while True:
            try:
                await self.refresh_due()
            except Exception:
                log.exception(
                    "token sweep failed; next sweep in %.0fs",
                    self.store.config.tokens.refresh_interval,
                )
            await self.store.periods.wait(lambda: self.store.config.tokens.refresh_interval)

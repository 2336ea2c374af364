"""Agency work: location pairs minted with a company's token, and the installs kept pending.

Guarantees:

- A location is minted (`POST /oauth/locationToken`) single flight with its refreshes: a mint
  that finds one in flight waits for it and mints only if the location is still not usable.
- Mints are paced per company and retried on 429/5xx/timeouts with backoff for
  `MINT_RETRY_SECONDS`; a 401 refreshes the company token once per attempt. One that still fails
  is kept as a pending install (section ``pending_installs``) and retried by the next
  reconciliation (`reconcile.py`), so an agency install never leaves a location uninstalled.
- A mint answered after an UNINSTALL of the location or of its company was stored installs
  nothing (`Uninstalled`): GHL's answer predates the UNINSTALL.
- A reconciliation's mint of a location ``castghld forget`` deleted is not made, nor stored if the
  forget came while it was queued or in flight (`Uninstalled`): only a new INSTALL webhook or an
  OAuth install ends a forget (`lifecycle.py`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from castghld.ghl import GHLClient, GHLError, TokenUnavailable, refresh_once_on_401
from castghld.pacing import retry_delay
from castghld.tokens.flight import SingleFlight, same_generation
from castghld.tokens.refresh import Refresher
from castghld.tokens.store import (
    COMPANIES,
    FORGOTTEN,
    INSTALLS,
    SOURCE_RECONCILED,
    UNINSTALLS,
    InstallStore,
    log,
    pair_from_answer,
    usable,
)

MINT_CONCURRENCY = 8
# A mint answered 429/5xx/timeout is retried with backoff for this long; after that the next
# reconciliation tries again.
MINT_RETRY_SECONDS = 60.0


class Uninstalled(TokenUnavailable):
    """The location (or its company) was uninstalled while its token request was in flight."""


class Minter:
    """Location pairs from a company's agency token (see the module docstring)."""

    def __init__(
        self, store: InstallStore, flights: SingleFlight, refresher: Refresher, ghl: GHLClient
    ):
        self.store = store
        self.state = store.state
        self.flights = flights
        self.refresher = refresher
        self.ghl = ghl

    async def mint_many(
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
                    await self.store.keep_pending(location_id, company_id, None)

        workers = min(MINT_CONCURRENCY, len(queue))
        await asyncio.gather(*(worker() for _ in range(workers)))
        minted.sort(key=location_ids.index)
        return minted, failed

    async def mint_location(self, company_id: str, location_id: str, source: str) -> str:
        """Get and store a location pair with the company's token (`/oauth/locationToken`); its
        access token. Single flight with refreshes: if one is in flight for the location, wait
        for it, and mint only if the location is still not usable."""
        while True:
            task = self.flights.get(INSTALLS, location_id)
            if task is None:
                break
            await asyncio.wait([task])
            record = self.store.get(location_id)
            if usable(record):
                return await self.store.durable(record["access_token"])
        base = self.state.get(INSTALLS, location_id)
        task = self.flights.join(
            INSTALLS, location_id, lambda: self.mint_now(company_id, location_id, base, source)
        )
        return await asyncio.shield(task)

    async def mint_now(
        self, company_id: str, location_id: str, base: dict[str, Any] | None, source: str
    ) -> str:
        """Mint and store the pair if the location's record is still `base` (the caller holds
        the location's single flight: `mint_location`, or a refresh re-minting)."""
        forgotten = source == SOURCE_RECONCILED and self.state.get(FORGOTTEN, location_id)
        if forgotten:  # `castghld forget` while this mint was queued: not GHL's new INSTALL
            raise Uninstalled(location_id, "forgotten by the operator")
        tombstone = self.state.get(UNINSTALLS, location_id)
        answer = await self._mint_request(company_id, location_id)
        now = time.time()
        pair = pair_from_answer(answer, now)
        if self.state.get(UNINSTALLS, location_id) != tombstone or (
            self.state.get(COMPANIES, company_id) is None
        ):
            # An UNINSTALL (of the location or its company) was stored while we minted: GHL's
            # answer predates it, and installing now would undo it.
            raise Uninstalled(location_id, "uninstalled while minting")
        current = self.state.get(INSTALLS, location_id)
        if not same_generation(current, base):
            log.info(
                "location=%s was reinstalled while minting; keeping the newer pair", location_id
            )
            if usable(current):
                return await self.store.durable(current["access_token"])
            raise TokenUnavailable(location_id, "changed while minting", retryable=True)
        record = {**pair, "company_id": company_id, "installed_at": now, "source": source}
        await self.store.store(INSTALLS, location_id, record, rollback=True)
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
                    lambda: self.refresher.company_token(company_id),
                    lambda token: self.ghl.location_token(token, company_id, location_id),
                    lambda rejected: self.refresher.refresh(COMPANIES, company_id, rejected),
                )
            except GHLError as e:
                if not e.retryable:
                    raise
                delay = retry_delay(attempt, e.retry_after, base=1.0, cap=30.0)
                if time.monotonic() + delay > deadline or self.flights.stopping:
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

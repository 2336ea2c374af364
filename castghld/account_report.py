"""`castghld accounts`: each Cast account as the running daemon sees it.

`account_report` builds the document on the daemon's side (the admin socket's ``GET /accounts``);
`admin_client.accounts_command` asks the daemon for it and prints it. An account is named as in
logs and metrics (``cast.account``, or ``acct-`` and a hash of its key), never by its key; the
document carries no key, number or message text.

Per account: ``state`` (``ok`` or ``paused`` with ``reason`` and ``paused_since``), ``credits``
and ``credits_read_at`` (read from Cast when the command runs; on a read error, the last value a
probe read, and ``error``), ``credits_needed`` (the parts the waiting messages will cost, counted
as Cast counts them, castghld.parts), ``waiting``, ``sends_last_hour``, ``locations`` (installed
or configured locations that send through it) and ``sender_ids`` (each sender ID it sends with,
``approved``: whether Cast lists it as approved for ``sms``; null for Cast's default sender).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from castghld.services import Services

READ_TIMEOUT = 10.0


def _iso(when: float | None) -> str | None:
    return None if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _waiting(daemon: Services) -> tuple[dict[str, int], dict[str, int]]:
    """Messages waiting for a send, and the parts they will cost, by account name: read from
    the index castghld.credits keeps beside the outbox (no pass over a 100k backlog)."""
    index = daemon.credits.waiting
    names = daemon.outbound.cast.account_names()
    return (
        {name: index.waiting(name) for name in names},
        {name: index.needed(name) for name in names},
    )


async def account_report(daemon: Services) -> dict[str, Any]:
    """The ``castghld accounts`` document (see the module docstring)."""
    cast = daemon.outbound.cast
    states = daemon.outbound.accounts
    accounts = cast.account_names()
    waiting, parts = _waiting(daemon)
    locations: dict[str, set[str]] = {}
    senders: dict[str, set[str]] = {}
    location_ids = set(daemon.installations.location_ids()) | set(daemon.config.cast.locations)
    for location_id in sorted(location_ids):
        account = cast.account_for(location_id)
        locations.setdefault(account.name, set()).add(location_id)
        senders.setdefault(account.name, set()).add(account.sender_id)
    for name, account in accounts.items():
        senders.setdefault(name, set()).add(account.sender_id)
    reads = await asyncio.gather(
        *(asyncio.wait_for(states.read(a), READ_TIMEOUT) for a in accounts.values()),
        return_exceptions=True,
    )
    rows = []
    for (name, account), read in zip(accounts.items(), reads, strict=True):
        if isinstance(read, BaseException):
            read = {"error": "no answer from Cast"}
        credits, read_at = states.balances.get(name, (None, None))
        approved = read.get("approved_sender_ids")
        pause = states.paused.get(name)
        rows.append(
            {
                "account": name,
                "sandbox": account.sandbox,
                "state": "paused" if pause else "ok",
                "reason": pause.code if pause else None,
                "paused_since": _iso(pause.since) if pause else None,
                "credits": credits,
                "credits_read_at": _iso(read_at),
                "credits_needed": parts[name],
                "waiting": waiting[name],
                "sends_last_hour": states.sends_last_hour(name),
                "locations": sorted(locations.get(name, ())),
                "sender_ids": [
                    {
                        "sender_id": sender or None,
                        "approved": None if not sender or approved is None else sender in approved,
                    }
                    for sender in sorted(senders[name])
                ],
                **({"error": read["error"]} if "error" in read else {}),
            }
        )
    return {"accounts": rows}

"""Fake GHL and fake Cast for bench/run.py, in a process of their own (their CPU is not the
daemon's), plus the daemon's state seeded with installed locations whose tokens they accept.

Usage: python bench/upstreams.py CONFIG.json
CONFIG: {"state_dir", "key_file", "installs", "expires_in", "cast_hang", "cast_rate",
"progress_file"}; for bench/campaign.py also "cast_keys" (API keys, one Cast account each),
"cast_logs" (serve GET /api/v1/sms/logs), "cast_ip_burst" (Cast's per-IP bucket, 50) and
"delivery_delay" (seconds until a receipt).
Prints one JSON line {"ghl": url, "cast": url} once serving; on SIGTERM prints one JSON line of
request counts by route and contract violations, then exits.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import pathlib
import re
import secrets
import signal
import sys
import time
from typing import Any

from castghld.fakes import FakeCast, FakeGHL
from castghld.state import KeyRing, StateStore

JWT_PADDING = 700  # GHL's access tokens are JWTs of ~1 KB; the fake's are 43 characters


class JWTSizedGHL(FakeGHL):
    """FakeGHL whose tokens are as long as GHL's, so the state file has its real size."""

    def _issue(self, grant: Any, expires_in: int | None = None) -> dict[str, Any]:
        answer = super()._issue(grant, expires_in)
        for field, table in (("access_token", self._access), ("refresh_token", self._refresh)):
            longer = answer[field] + "." + secrets.token_urlsafe(JWT_PADDING)
            table[longer] = table.pop(answer[field])
            answer[field] = longer
        return answer


def location_id(n: int) -> str:
    return f"benchloc{n:012d}"


async def seed_state(ghl: FakeGHL, spec: dict[str, Any]) -> None:
    store = StateStore(spec["state_dir"], KeyRing.load(spec["key_file"]))
    store.load()
    now = time.time()
    for n in range(spec["installs"]):
        answer = ghl.issue_tokens(location_id(n), "benchcompany", expires_in=spec["expires_in"])
        store.put(
            "installs",
            location_id(n),
            {
                "access_token": answer["access_token"],
                "refresh_token": answer["refresh_token"],
                "expires_at": now + spec["expires_in"],
                "scope": answer["scope"],
                "status": "ok",
                "refreshed_at": now,
                "company_id": "benchcompany",
                "installed_at": now,
            },
        )
    await store.commit()
    store.close()


async def write_progress(ghl: FakeGHL, path: str) -> None:
    """Every 0.1 s, how many messages GHL has been told are `delivered` (in `path`), so the
    bench learns it without asking the daemon (whose CPU it measures)."""
    while True:
        delivered = sum(
            1 for updates in ghl.statuses.values() if updates[-1].get("status") == "delivered"
        )
        pathlib.Path(path + ".tmp").write_text(str(delivered))  # noqa: ASYNC240 (tiny, tmpfs-fast)
        os.replace(path + ".tmp", path)
        await asyncio.sleep(0.1)


async def main(spec: dict[str, Any]) -> None:
    ghl = JWTSizedGHL()
    rate = spec.get("cast_rate", 10)
    cast = FakeCast(messages_per_second=rate, requests_per_second=max(30, rate * 3))
    if spec.get("cast_keys"):
        cast.api_keys = {key: f"account{n}" for n, key in enumerate(spec["cast_keys"])}
    cast.logs_enabled = bool(spec.get("cast_logs"))
    cast.ip_burst = spec.get("cast_ip_burst")
    cast._ip_tokens = (float(cast.ip_burst or 0), time.monotonic())
    cast.delivery_delay = float(spec.get("delivery_delay", 0.0))
    await ghl.start()
    await cast.start()
    if spec.get("cast_hang"):
        cast.hang("send")
    await seed_state(ghl, spec)
    print(json.dumps({"ghl": ghl.url, "cast": cast.url}), flush=True)
    progress = None
    if spec.get("progress_file"):
        progress = asyncio.ensure_future(write_progress(ghl, spec["progress_file"]))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    if progress is not None:
        progress.cancel()
    routes: collections.Counter[str] = collections.Counter()
    for fake, name in ((ghl, "ghl"), (cast, "cast")):
        patterns = [(method, re.compile(path), route) for method, path, route, _ in fake.routes]
        for call in fake.calls:
            path = call.path.split("?")[0]
            route = next(
                (r for m, p, r in patterns if m == call.method and p.fullmatch(path)), call.path
            )
            routes[f"{name} {route}"] += 1
    violations = ghl.violations + cast.violations
    summary = {"routes": routes, "violations": violations[:20], **outcomes(ghl, cast)}
    print(json.dumps(summary), flush=True)


def outcomes(ghl: FakeGHL, cast: FakeCast) -> dict[str, int]:
    """What each message ended as at the fakes: sent once, final status reported once."""
    reports = [[u.get("status") for u in updates] for updates in ghl.statuses.values()]
    keys = collections.Counter(s["idempotency_key"] for s in cast.sent)
    limited = [v for v in ghl.violations + cast.violations if "rate limit" in v or "more than" in v]
    return {
        "sent": len(cast.sent),
        "sent_twice": sum(1 for n in keys.values() if n > 1),
        "delivered_once": sum(
            1 for r in reports if r[-1] == "delivered" and r.count("delivered") == 1
        ),
        "answered_429": len(limited),
        "violations_total": len(ghl.violations) + len(cast.violations),
    }


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        asyncio.run(main(json.load(f)))

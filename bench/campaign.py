"""Issue 18's table, measured from outside: `.venv/bin/python bench/campaign.py [--accounts N..]`.

A campaign at Cast's limits. The daemon runs as `castghld serve` in its own process; the fake GHL
and the fake Cast in another (bench/upstreams.py: Cast enforces 10 sends/s per account and 30
requests/s per IP with bursts of 50, as SPEC §5 documents, and answers each receipt
`--receipt-delay` seconds after the send; GHL enforces 100 requests / 10 s per location); this
process posts the campaign's signed webhooks and watches the fakes' progress file. Each Cast
account serves `--locations` locations (its own API key through ``cast.locations``), each
location gets `--messages` messages, interleaved.

Printed per account count: drain (first webhook to the last ``delivered`` in GHL), ideal (the
messages at Cast's limits, min(10 x accounts, 30)/s, plus the receipt delay), ratio, Cast
requests per message by kind, GHL status PUTs per message, 429s from either fake, and whether
every message was sent once and reported ``delivered`` once. `--no-logs`: a Cast without the
logs endpoint (per-message lookups). `--json PATH` writes every number. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from run import Processes, Setup, load_average, wait_http  # bench/ is sys.path[0]
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from upstreams import location_id

from castghld.fakes import FakeGHL

WEBHOOK_PATH = "/api/ghl/v1/webhook/messages"
CAST_IP_RATE = 30
CAST_ACCOUNT_RATE = 10
CAST_IP_BURST = 50  # SPEC §5: 30 requests/s per IP, burst 50


def cast_key(n: int) -> str:
    return "cast_test_key" if n == 0 else f"cast_live_bench{n:03d}"


async def post_campaign(url: str, ghl: FakeGHL, bodies: list[dict[str, Any]]) -> None:
    """The campaign's webhooks, 8 at a time, as GHL would deliver them."""
    client = AsyncHTTPClient()
    queue = list(reversed(bodies))

    async def worker() -> None:
        while queue:
            body = json.dumps(queue.pop()).encode()
            headers = {"Content-Type": "application/json", **ghl.sign(body)}
            request = HTTPRequest(url + WEBHOOK_PATH, method="POST", body=body, headers=headers)
            response = await client.fetch(request, raise_error=False)
            if response.code != 200:
                raise SystemExit(f"webhook answered {response.code}: {response.body[:200]!r}")

    await asyncio.gather(*(worker() for _ in range(8)))


def campaign_bodies(accounts: int, locations: int, messages: int) -> list[dict[str, Any]]:
    count = accounts * locations
    return [
        {
            "contactId": f"contact{n}",
            "locationId": location_id(n % count),
            "messageId": f"campaign-{n:06d}",
            "type": "SMS",
            "phone": f"+63917{n % 10_000_000:07d}",
            "message": "Our sale starts tomorrow at 9:00. Reply STOP to opt out.",
            "attachments": [],
            "userId": "benchuser",
        }
        for n in range(count * messages)
    ]


def run_campaign(root: pathlib.Path, accounts: int, args: argparse.Namespace) -> dict[str, Any]:
    ghl = FakeGHL()
    procs = Processes()
    try:
        setup = Setup(root, f"campaign{accounts}", ghl)
        progress = setup.dir / "delivered"
        count = accounts * args.locations
        upstreams, urls = setup.start_upstreams(
            procs,
            installs=count,
            expires_in=86399,
            cast_keys=[cast_key(n) for n in range(accounts)],
            cast_logs=not args.no_logs,
            cast_ip_burst=CAST_IP_BURST,
            delivery_delay=args.receipt_delay,
            progress_file=str(progress),
        )
        overrides = {
            location_id(n): {"api_key": cast_key(n % accounts)}
            for n in range(count)
            if n % accounts
        }
        daemon = setup.start_daemon(procs, urls, cast={"locations": overrides})
        wait_http(setup.url + "/healthz", 60, daemon)
        bodies = campaign_bodies(accounts, args.locations, args.messages)
        started = time.monotonic()
        asyncio.run(post_campaign(setup.url, ghl, bodies))
        posted = time.monotonic() - started
        delivered = 0.0
        while time.monotonic() - started < args.limit:
            if progress.exists():
                delivered = float(progress.read_text() or 0)
            if delivered >= len(bodies):
                break
            time.sleep(0.05)
        drain = time.monotonic() - started
        time.sleep(1.0)  # let a late duplicate show up at the fakes before they count
        procs.stop(daemon, 60)
        procs.stop(upstreams)
        assert upstreams.stdout is not None
        summary = json.loads(upstreams.stdout.readline() or "{}")
    finally:
        procs.stop_all()
    return result(accounts, len(bodies), posted, delivered, drain, summary, args)


def result(
    accounts: int,
    n: int,
    posted: float,
    delivered: float,
    drain: float,
    summary: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    routes = summary.get("routes", {})
    rate = min(CAST_ACCOUNT_RATE * accounts, CAST_IP_RATE)
    ideal = n / rate + args.receipt_delay
    kinds = {kind: routes.get(f"cast {kind}", 0) / n for kind in ("send", "sms_logs", "sms_status")}
    return {
        "accounts": accounts,
        "locations": accounts * args.locations,
        "messages": n,
        "posted_s": posted,
        "delivered": delivered,
        "drain_s": drain,
        "msg_per_s": n / drain,
        "ideal_s": ideal,
        "ratio": ideal / drain,
        "cast_per_message": sum(kinds.values()),
        "cast_by_kind": kinds,
        "ghl_puts_per_message": routes.get("ghl status", 0) / n,
        "answered_429": summary.get("answered_429"),
        "sent": summary.get("sent"),
        "sent_twice": summary.get("sent_twice"),
        "delivered_once": summary.get("delivered_once"),
        "violations": summary.get("violations", []),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        "| Cast accounts | messages | drain | ideal | ratio | Cast requests per message "
        "(send + logs + lookups) | GHL PUTs per message | 429s | delivered once |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        k = r["cast_by_kind"]
        print(
            f"| {r['accounts']} | {r['messages']} | {r['drain_s']:.1f} s "
            f"({r['msg_per_s']:.1f} msg/s) | {r['ideal_s']:.0f} s | {r['ratio']:.2f} | "
            f"{r['cast_per_message']:.3f} ({k['send']:.2f} + {k['sms_logs']:.3f} + "
            f"{k['sms_status']:.3f}) | {r['ghl_puts_per_message']:.2f} | {r['answered_429']} | "
            f"{r['delivered_once']}/{r['messages']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--locations", type=int, default=3, help="per Cast account")
    parser.add_argument("--messages", type=int, default=100, help="per location")
    parser.add_argument("--receipt-delay", type=float, default=8.0)
    parser.add_argument("--no-logs", action="store_true", help="Cast without the logs endpoint")
    parser.add_argument("--limit", type=float, default=600.0, help="seconds per campaign at most")
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"commit {commit}, load average {load_average()}, python {sys.version.split()[0]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="castghld-campaign-") as tmp:
        for accounts in args.accounts:
            results.append(run_campaign(pathlib.Path(tmp), accounts, args))
            r = results[-1]
            print(f"  {accounts} account(s): drain {r['drain_s']:.1f} s, ratio {r['ratio']:.2f}")
            if r["violations"]:
                print("  violations:", r["violations"][:5])
    print_table(results)
    print(f"load average after: {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

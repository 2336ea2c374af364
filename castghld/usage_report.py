"""`castghld usage`: the rebilling ledger (castghld.usage) printed, and set beside Cast's own.

Guarantees:
- The rows come from the running daemon (admin socket: its unflushed counts included) or, with no
  daemon answering, from the state file read-only (a stopped daemon's, or a backup's).
- Table (default), ``--csv`` (one header line, then one line per row) or ``--json``; counts only,
  never a number or a text.
- ``--check`` asks Cast, per configured account, for its daily usage of the same days
  (``GET /api/v1/account/usage``, one request each) and prints, per day and account, Cast's
  messages and parts beside ours and the difference; exit 1 when any differs (something else
  sent on the account, or counts a crash lost), 75 when Cast did not answer. Cast's ``total`` is
  compared with our ``sent``, its ``parts`` with our ``parts``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from castghld.config import Config
from castghld.usage import COLUMNS, days_before, read_rows, today, totals

EXIT_DIFFERS = 1
EXIT_TEMPFAIL = 75
DEFAULT_DAYS = 30  # like Cast's usage endpoint: the last 30 days


def add_usage_command(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``usage`` command's arguments, for cli.build_parser."""
    usage = add_command(
        "usage",
        help="per location and day: messages sent, parts, outcomes, replies (rebilling)",
        description="Print the usage ledger (Manila days; counts only): messages Cast accepted, "
        "parts charged, delivered, undelivered, failed (never sent), replies. Read from the "
        "running daemon, or from the state file when none runs. --check puts Cast's own daily "
        "usage per account beside it (exit 1 when a day differs).",
    )
    usage.add_argument(
        "--from", dest="start", metavar="DATE", help="first day (default: 29 days before --to)"
    )
    usage.add_argument("--to", dest="end", metavar="DATE", help="last day (default: today)")
    usage.add_argument("--location", metavar="ID", help="one location only")
    shape = usage.add_mutually_exclusive_group()
    shape.add_argument(
        "--csv",
        action="store_const",
        const="csv",
        dest="format",
        default="table",
        help="one header line, then one line per day, location and account",
    )
    shape.add_argument(
        "--json", action="store_const", const="json", dest="format", help="one JSON document"
    )
    usage.add_argument("--check", action="store_true", help="compare with Cast's daily usage")


def usage_range(start: str | None, end: str | None) -> tuple[str, str]:
    """(from, to) with the defaults: to = today (Manila), from = 29 days before it."""
    end = end or today()
    return start or days_before(end, DEFAULT_DAYS - 1), end


def load_rows(
    config: Config, start: str, end: str, location_id: str | None
) -> tuple[list[dict[str, Any]], str]:
    """(rows, where they came from); StateError/StartupError if neither the daemon nor the state
    file can give them."""
    from castghld.admin_client import AdminUnavailable, call

    query = {"from": start, "to": end}
    if location_id:
        query["location"] = location_id
    try:
        status, doc = call(config, "GET", "/usage?" + urlencode(query))
    except AdminUnavailable:
        return _offline_rows(config, start, end, location_id), "the state file (no daemon running)"
    if status != 200:
        raise ValueError(doc.get("message", status) if isinstance(doc, dict) else status)
    return doc["rows"], "the running daemon"


def _offline_rows(
    config: Config, start: str, end: str, location_id: str | None
) -> list[dict[str, Any]]:
    from castghld.metrics import Metrics
    from castghld.startup import StartupProblems, init_state
    from castghld.usage import SECTION

    problems = StartupProblems()
    _keyring, state = init_state(config, Metrics(), problems)
    try:
        problems.raise_any()
        return read_rows(state.items(SECTION), start, end, location_id)
    finally:
        state.close()


def print_rows(rows: list[dict[str, Any]], fmt: str, start: str, end: str, source: str) -> None:
    if fmt == "json":
        doc = {"from": start, "to": end, "rows": rows, "totals": totals(rows)}
        print(json.dumps(doc, indent=2))
        return
    header = ["date", "location_id", "account", *COLUMNS]
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([row[name] for name in header])
        return
    print(f"usage {start} .. {end} (Manila days), from {source}")
    line = "{:<10} {:<26} {:<15}" + " {:>11}" * len(COLUMNS)
    print(line.format(*(name.upper() for name in header)))
    for row in rows:
        print(line.format(*(row[name] for name in header)))
    print(line.format("total", "", "", *totals(rows).values()))


async def cast_usage(config: Config, start: str, end: str) -> dict[str, Any]:
    """account name -> Cast's answer (``daily`` rows), or the `CastError` it gave."""
    from castghld.cast import CastClient, CastError
    from castghld.metrics import Metrics
    from castghld.online import cast_accounts

    cast = CastClient(config, Metrics())
    answers: dict[str, Any] = {}
    for _where, account in cast_accounts(config):
        try:
            answers[account.name] = await cast.account_info(
                account, "usage", {"from": start, "to": end}
            )
        except CastError as e:
            answers[account.name] = e
    return answers


def compare(
    rows: list[dict[str, Any]], answers: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """(per day and account: ours and Cast's messages and parts, and whether they agree;
    problems: accounts Cast did not answer for)."""
    ours: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        counts = ours.setdefault((row["date"], row["account"]), [0, 0])
        counts[0] += row["sent"]
        counts[1] += row["parts"]
    theirs: dict[tuple[str, str], list[int]] = {}
    problems = []
    for account, answer in answers.items():
        if isinstance(answer, Exception):
            problems.append(f"{account}: Cast's usage not read: {answer}")
            continue
        for day in answer.get("daily") or []:
            if isinstance(day, dict) and isinstance(day.get("date"), str):
                key = (day["date"][:10], account)
                theirs[key] = [_count(day.get("total")), _count(day.get("parts"))]
    out = []
    for date, account in sorted(set(ours) | set(theirs)):
        mine = ours.get((date, account), [0, 0])
        cast = theirs.get((date, account), [0, 0])
        out.append(
            {
                "date": date,
                "account": account,
                "cast_messages": cast[0],
                "our_sent": mine[0],
                "cast_parts": cast[1],
                "our_parts": mine[1],
                "agrees": mine == cast,
            }
        )
    return out, problems


def _count(value: Any) -> int:
    return value if type(value) is int else 0


CHECK_COLUMNS = ("date", "account", "cast_messages", "our_sent", "cast_parts", "our_parts")


def print_comparison(table: list[dict[str, Any]], problems: list[str], fmt: str) -> None:
    """The --check table (text or CSV), then one stderr line per account Cast did not answer
    for."""
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([*CHECK_COLUMNS, "agrees"])
        for r in table:
            writer.writerow([r[name] for name in CHECK_COLUMNS] + [str(r["agrees"]).lower()])
    else:
        print()
        print("Cast's usage beside ours (messages: Cast's total, castghld's sent)")
        line = "{:<10} {:<15} {:>13} {:>9} {:>10} {:>9}  {}"
        print(line.format(*(name.upper() for name in CHECK_COLUMNS), ""))
        for r in table:
            verdict = "agrees"
            if not r["agrees"]:
                verdict = (
                    f"differs: Cast {r['cast_messages'] - r['our_sent']:+d} message(s), "
                    f"{r['cast_parts'] - r['our_parts']:+d} part(s)"
                )
            print(line.format(*(r[name] for name in CHECK_COLUMNS), verdict))
        differ = sum(not r["agrees"] for r in table)
        print(f"{differ} day(s) differ" if differ else "Cast's usage agrees with castghld's ledger")
    for problem in problems:
        print(f"castghld: {problem}", file=sys.stderr)


def usage_command(
    config: Config,
    start: str | None,
    end: str | None,
    location_id: str | None,
    fmt: str,
    check: bool,
) -> int:
    """`castghld usage`: 0; with --check 1 when a day differs, 75 when Cast did not answer.
    Raises StartupError (state file), ValueError (a refused query) for the CLI to report."""
    start, end = usage_range(start, end)
    rows, source = load_rows(config, start, end, location_id)
    if not check:
        print_rows(rows, fmt, start, end, source)
        return 0
    from castghld.app import configure_http_client

    configure_http_client(config.delivery.request_timeout)
    # Cast counts per account: the comparison takes every location of the account.
    every = load_rows(config, start, end, None)[0] if location_id else rows
    table, problems = compare(every, asyncio.run(cast_usage(config, start, end)))
    if fmt == "json":
        doc = {"from": start, "to": end, "rows": rows, "check": table, "problems": problems}
        print(json.dumps(doc, indent=2))
    else:
        print_rows(rows, fmt, start, end, source)
        print_comparison(table, problems, fmt)
    if problems:
        return EXIT_TEMPFAIL
    return EXIT_DIFFERS if any(not r["agrees"] for r in table) else 0


def run_usage(config: Config, args: Any) -> int:
    """`castghld usage` from the parsed command line; the exit code (2: a bad date or an
    unreadable state file, with one line on stderr)."""
    from castghld.exits import fail
    from castghld.startup import StartupError
    from castghld.usage import parse_day

    try:
        start = parse_day(args.start) if args.start else None
        end = parse_day(args.end) if args.end else None
        return usage_command(config, start, end, args.location, args.format, args.check)
    except StartupError as e:
        return fail(e.problems, e.transient)
    except ValueError as e:
        return fail([f"usage: {e}"])

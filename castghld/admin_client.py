"""The command side of the admin socket (castghld.admin): `castghld outbox ...`, `forget` and
`accounts` (its document is built by castghld.account_report).

Guarantees:
- The commands need only the config's paths (`state.dir`, `server.admin_socket`): the CLI loads
  the config without reading its secrets for them, so an operator runs them outside the unit's
  credentials.
- The socket is found as the daemon makes it: `server.admin_socket` when set; else the first of
  `$RUNTIME_DIRECTORY/admin.sock` (set only inside the unit), `/run/castghld/admin.sock`
  (systemd's `RuntimeDirectory=castghld`) and `<state.dir>/admin.sock` that exists.
- Exit codes: 0 done; 75 when no daemon answers (retry later); 1 when the daemon refused (its
  message on stderr); 2 for a usage error. Nothing printed carries a message text or a full
  number (the daemon never sends them).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
from typing import Any
from urllib.parse import quote, urlencode

from castghld.admin import LIST_DEFAULT, SOCKET_NAME, runtime_directory
from castghld.config import Config

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75
# A message or location id longer than this is not one (GHL's and Cast's are tens of characters);
# sent, it could pass the daemon's request limit (castghld.admin.MAX_REQUEST_HEADERS).
MAX_ID_CHARS = 1000
# systemd's RuntimeDirectory=castghld, where the unit's daemon puts its socket.
RUNTIME_DIR_DEFAULT = "/run/castghld"
# `castghld outbox show`, text mode: these first, in this order, then the rest.
SHOW_FIRST = ("id", "state", "attempts", "last_error", "next_attempt_at")


class AdminUnavailable(Exception):
    """No daemon answers on the admin socket."""


def socket_candidates(config: Config) -> list[str]:
    """Where a running daemon's socket may be, in the order they are tried."""
    if config.server.admin_socket:
        return [config.server.admin_socket]
    directories = [runtime_directory(), RUNTIME_DIR_DEFAULT, config.state.dir]
    paths = [os.path.join(d, SOCKET_NAME) for d in directories if d]
    return list(dict.fromkeys(paths))


def find_socket(config: Config) -> str:
    """The first candidate that exists; AdminUnavailable naming them all if none does."""
    candidates = socket_candidates(config)
    for path in candidates:
        if os.path.exists(path):
            return path
    raise AdminUnavailable(
        f"{' or '.join(candidates)}: no running castghld answers (no admin socket; "
        "set server.admin_socket if the daemon puts it elsewhere)"
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(config: Config, method: str, path: str, timeout: float = 30.0) -> tuple[int, Any]:
    """One request to the running daemon's admin socket: (status, decoded JSON answer).
    Raises AdminUnavailable if no daemon listens there."""
    sock_path = find_socket(config)
    connection = _UnixConnection(sock_path, timeout)
    try:
        connection.request(method, path, body=b"" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise AdminUnavailable(f"{sock_path}: no running castghld answers ({e.strerror})") from None
    except PermissionError:
        raise AdminUnavailable(
            f"{sock_path}: permission denied (run as root or the service user)"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        # Closed without an answer (a daemon stopping, a request over its limits), a timeout,
        # an answer that is not JSON: said in one line, not a traceback.
        raise AdminUnavailable(
            f"{sock_path}: no answer from castghld ({e or type(e).__name__})"
        ) from None
    finally:
        connection.close()


def _admin(config: Config, method: str, path: str) -> tuple[int, Any]:
    """(0, the daemon's JSON answer), or (exit code, None) after saying why on stderr."""
    from castghld.exits import error

    try:
        status, doc = call(config, method, path)
    except AdminUnavailable as e:
        error(str(e))
        return EXIT_TEMPFAIL, None
    if status != 200:
        message = doc.get("message", status) if isinstance(doc, dict) else status
        error(str(message))
        return EXIT_REFUSED, None
    return 0, doc


def outbox_command(
    config: Config,
    action: str,
    rid: str | None,
    as_json: bool = False,
    limit: int = LIST_DEFAULT,
    every: bool = False,
    account: str = "",
    location: str = "",
) -> int:
    """`castghld outbox [list|show ID|retry ID|retry --all|drop ID]` through the running daemon.
    ID is the record id (`out:...`, `in:...`) or the bare message id."""
    from castghld.exits import fail

    if every and action != "retry":
        return fail(["--all goes with retry only (castghld outbox retry --all)"])
    if every and rid:
        return fail(["outbox retry: give a message ID or --all, not both"])
    if (account or location) and not every:
        return fail(["--account and --location narrow retry --all"])
    if action != "list" and not rid and not every:
        return fail([f"outbox {action} needs a message ID (see castghld outbox list)"])
    if len(rid or "") > MAX_ID_CHARS:
        return fail([f"outbox {action}: a message ID is at most {MAX_ID_CHARS} characters"])
    if every:
        query = urlencode({k: v for k, v in (("account", account), ("location", location)) if v})
        code, doc = _admin(config, "POST", "/retry-waiting" + (f"?{query}" if query else ""))
        if not code:
            print(json.dumps(doc, indent=2) if as_json else f"{doc['count']} send(s) retried now")
        return code
    path = f"/outbox?limit={limit}" if action == "list" else f"/outbox/{quote(rid or '', safe='')}"
    if action in ("retry", "drop"):
        path += "/" + action
    code, doc = _admin(config, "POST" if action in ("retry", "drop") else "GET", path)
    if code:
        return code
    if as_json:
        print(json.dumps(doc, indent=2))
    elif action == "list":
        print_list(doc)
    elif action == "show":
        print_record(doc)
    else:
        print(f"{doc['id']}: {doc['outcome']}")
    return 0


def print_list(doc: dict[str, Any]) -> None:
    records = doc["records"]
    if not records:
        print("outbox empty")
        return
    print(f"{'ID':<40} {'KIND':<9} {'STAGE':<10} {'LOCATION':<26} AGE")
    for r in records:
        age = "-" if r["age_seconds"] is None else f"{r['age_seconds']:.0f}s"
        print(f"{r['id']:<40} {r['kind']:<9} {r['stage']:<10} {r['location_id']:<26} {age}")
    if doc["total"] > len(records):
        print(
            f"... the {len(records)} oldest of {doc['total']} unfinished messages "
            "(--limit N shows more)"
        )


def print_record(doc: dict[str, Any]) -> None:
    """One `name: value` line per field, where it is first (`SHOW_FIRST`)."""
    names = [n for n in SHOW_FIRST if n in doc] + [n for n in doc if n not in SHOW_FIRST]
    width = max(len(n) for n in names) + 1
    for name in names:
        value = doc[name]
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name + ':':<{width}} {'-' if shown is None else shown}")


def forget(config: Config, location_id: str) -> int:
    from castghld.cli import fail

    if len(location_id) > MAX_ID_CHARS:
        return fail([f"forget: a location ID is at most {MAX_ID_CHARS} characters"])
    code, _ = _admin(config, "POST", f"/installs/{quote(location_id, safe='')}/forget")
    if code:
        return code
    print(f"{location_id}: forgotten")
    return 0


def accounts_command(config: Config, as_json: bool = False) -> int:
    """`castghld accounts [--json]` through the running daemon's admin socket."""
    code, doc = _admin(config, "GET", "/accounts")
    if code:
        return code
    if as_json:
        print(json.dumps(doc, indent=2))
        return 0
    for row in doc["accounts"]:
        state = "ok"
        if row["state"] == "paused":
            state = f"paused: {row['reason']} since {row['paused_since']}"
        credits = "unknown" if row["credits"] is None else f"{row['credits']:g}"
        if row["credits_read_at"]:
            credits += f" (read {row['credits_read_at']})"
        sandbox = " (sandbox key)" if row["sandbox"] else ""
        print(f"{row['account']}{sandbox}: {state}")
        print(f"  credits {credits}; needed by waiting messages {row['credits_needed']}")
        print(f"  waiting {row['waiting']}; sent in the last hour {row['sends_last_hour']}")
        print(f"  locations: {', '.join(row['locations']) or '-'}")
        for sender in row["sender_ids"]:
            approved = {True: "approved", False: "NOT approved", None: "-"}[sender["approved"]]
            print(f"  sender ID {sender['sender_id'] or '(Cast default)'}: {approved}")
        if "error" in row:
            print(f"  Cast answered {row['error']}", file=sys.stderr)
    return 0

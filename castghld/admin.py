"""The local admin endpoint: what `castghld outbox ...` and `castghld forget` talk to while the
daemon runs, so they act through the daemon's own outbox and state instead of writing its files
beside it (two writers would corrupt the journal).

Design: HTTP over a unix socket, `<state.dir>/admin.sock`, created 0600 by the daemon (only the
service user, and root, can connect; nothing listens on a network port). It lives while the daemon
serves and is removed at stop. Answers are JSON; they never carry a token, a message body or a
full phone number (numbers are masked to their last 4 digits).

Routes: `GET /outbox[?limit=N]` (the N oldest unfinished messages, default 100, and the total:
listing all of a 100k backlog would hold the IOLoop for seconds), `GET /outbox/ID`,
`POST /outbox/ID/retry`, `POST /outbox/ID/drop`, `POST /installs/LOCATION/forget`,
`GET /accounts` (castghld.account_report), `GET /usage?from=DAY&to=DAY[&location=ID]` (the usage
ledger's rows, counts only).
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.netutil
import tornado.web

if TYPE_CHECKING:
    from castghld.services import Services

log = logging.getLogger("castghld.admin")

SOCKET_NAME = "admin.sock"
LIST_DEFAULT = 100
LIST_MAX = 10_000
# Record fields shown as they are (see castghld.records.OutboundRecord for what each one means);
# others are left out (bodies, numbers, tokens).
SHOWN_FIELDS = (
    "kind",
    "stage",
    "message_id",
    "location_id",
    "cast_id",
    "type",
    "attempted",
    "account",
    "sender_id",
    "tries",
    "report",
    "refused",
    "received_at",
    "accepted_at",
)
NUMBER_FIELDS = ("phone", "from", "to")


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def mask_number(value: Any) -> str:
    text = str(value or "")
    return "…" + text[-4:] if len(text) > 4 else "…"


def summary(rid: str, record: dict[str, Any], now: float) -> dict[str, Any]:
    """What an operator may see of a record: ids, stage, age; never the text or the number."""
    since = record.get("accepted_at") or record.get("received_at")
    age = round(now - since, 1) if isinstance(since, int | float) else None
    return {
        "id": rid,
        "kind": record.get("kind"),
        "stage": record.get("stage", "-"),
        "location_id": record.get("location_id", "-"),
        "age_seconds": age,
    }


def detail(rid: str, record: dict[str, Any], now: float) -> dict[str, Any]:
    out = summary(rid, record, now)
    for name in SHOWN_FIELDS:
        if name in record:
            value = record[name]
            out[name] = list(value) if isinstance(value, tuple) else value
    for name in NUMBER_FIELDS:
        if name in record:
            out[name] = mask_number(record[name])
    if "message" in record:
        out["message_chars"] = len(record["message"] or "")
    return out


class AdminHandler(tornado.web.RequestHandler):
    def initialize(self, daemon: Services) -> None:
        self.daemon = daemon

    def reply(self, status: int, doc: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.reply(status_code, {"error": "error", "message": self._reason})

    def record(self, rid: str) -> dict[str, Any] | None:
        record = self.daemon.outbox.records.get(rid)
        if record is None:
            self.reply(404, {"error": "not_found", "message": f"no unfinished message {rid}"})
        return record


class OutboxListHandler(AdminHandler):
    def get(self) -> None:
        try:
            limit = int(self.get_argument("limit", str(LIST_DEFAULT)))
        except ValueError:
            limit = -1
        if not 1 <= limit <= LIST_MAX:
            self.reply(400, {"error": "bad_limit", "message": f"limit must be 1..{LIST_MAX}"})
            return
        now = time.time()
        records = self.daemon.outbox.records  # in the order they were accepted: oldest first
        shown = [summary(rid, r, now) for rid, r in itertools.islice(records.items(), limit)]
        self.reply(200, {"records": shown, "total": len(records)})


class OutboxRecordHandler(AdminHandler):
    def get(self, rid: str) -> None:
        record = self.record(rid)
        if record is not None:
            self.reply(200, detail(rid, record, time.time()))


class OutboxActionHandler(AdminHandler):
    async def post(self, rid: str, action: str) -> None:
        if self.record(rid) is None:
            return
        outbox = self.daemon.outbox
        if action == "retry":
            if not outbox.retry(rid):
                self.reply(
                    409,
                    {
                        "error": "busy",
                        "message": f"{rid} is already being sent or waits for its retry; "
                        "it goes on by itself",
                    },
                )
                return
            log.warning("operator: %s dispatched again", rid, extra={"outcome": "retried"})
            self.reply(200, {"id": rid, "outcome": "retried"})
            return
        await outbox.drop(rid)
        log.warning(
            "operator: %s dropped from the outbox; nothing more is sent or reported for it",
            rid,
            extra={"outcome": "dropped", "reason": "operator"},
        )
        self.reply(200, {"id": rid, "outcome": "dropped"})


class ForgetHandler(AdminHandler):
    async def post(self, location_id: str) -> None:
        removed = await self.daemon.installations.uninstall(
            location_id=location_id, event_at=time.time()
        )
        if not removed:
            self.reply(404, {"error": "not_found", "message": f"{location_id} is not installed"})
            return
        log.warning(
            "operator: location=%s forgotten (tokens deleted)",
            location_id,
            extra={"location_id": location_id, "outcome": "forgotten", "reason": "operator"},
        )
        self.reply(200, {"location_id": location_id, "outcome": "forgotten"})


class UsageHandler(AdminHandler):
    def get(self) -> None:
        from castghld.usage import parse_day

        try:
            start = parse_day(self.get_argument("from"))
            end = parse_day(self.get_argument("to"))
        except (ValueError, tornado.web.MissingArgumentError) as e:
            self.reply(400, {"error": "bad_date", "message": f"from/to: {e}"})
            return
        location_id = self.get_argument("location", None) or None
        self.reply(200, {"rows": self.daemon.usage.rows(start, end, location_id)})


class AccountsHandler(AdminHandler):
    async def get(self) -> None:
        from castghld.account_report import account_report

        self.reply(200, await account_report(self.daemon))


default_handlers = [
    (r"/accounts", AccountsHandler),
    (r"/outbox", OutboxListHandler),
    (r"/outbox/([^/]+)", OutboxRecordHandler),
    (r"/outbox/([^/]+)/(retry|drop)", OutboxActionHandler),
    (r"/installs/([^/]+)/forget", ForgetHandler),
    (r"/usage", UsageHandler),
]


class AdminServer:
    """The admin socket of one daemon (see the module docstring)."""

    def __init__(self, daemon: Services):
        self.daemon = daemon
        self.path = socket_path(daemon.config.state.dir)
        self._server: tornado.httpserver.HTTPServer | None = None

    def start(self) -> None:
        """Listen on the socket (0600); a path too long for a unix socket is logged, not fatal:
        the daemon serves without the admin commands."""
        app = tornado.web.Application(
            [(p, cls, {"daemon": self.daemon}) for p, cls in default_handlers],
            log_function=lambda handler: None,
        )
        try:
            sock = tornado.netutil.bind_unix_socket(self.path, mode=0o600)
        except OSError as e:
            log.warning(
                "no admin socket at %s (%s): castghld outbox/forget unavailable", self.path, e
            )
            return
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_socket(sock)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        await self._server.close_all_connections()
        self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class AdminUnavailable(Exception):
    """No daemon answers on the admin socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(state_dir: str, method: str, path: str, timeout: float = 30.0) -> tuple[int, Any]:
    """One request to the running daemon's admin socket: (status, decoded JSON answer).
    Raises AdminUnavailable if no daemon listens there."""
    sock_path = socket_path(state_dir)
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
    finally:
        connection.close()

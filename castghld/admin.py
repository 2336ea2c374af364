"""The local admin endpoint: what `castghld outbox ...` and `castghld forget` talk to while the
daemon runs, so they act through the daemon's own outbox and state instead of writing its files
beside it (two writers would corrupt the journal). The command side is castghld.admin_client.

Design: HTTP over a unix socket, created 0600 by the daemon (only the service user, and root, can
connect; nothing listens on a network port). It lives while the daemon serves and is removed at
stop. Where (`daemon_socket_path`): `server.admin_socket` when set, else `admin.sock` in
`$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=castghld`: /run/castghld), else in `state.dir`.
Answers are JSON; they never carry a token, a message body or a full phone number (numbers are
masked to their last 4 digits). A request with a body over `MAX_REQUEST_BODY` bytes or headers
over `MAX_REQUEST_HEADERS` is refused (the commands send none).

Routes: `GET /outbox[?limit=N]` (the N oldest unfinished messages, default 100, and the total:
listing all of a 100k backlog would hold the IOLoop for seconds), `GET /outbox/ID`,
`POST /outbox/ID/retry`, `POST /outbox/ID/drop`, `POST /retry-waiting[?account=A&location=L]`
(cut every send backoff short), `POST /installs/LOCATION/forget`, `GET /accounts`
(castghld.account_report), `GET /usage?from=DAY&to=DAY[&location=ID]` (the usage ledger's rows,
counts only). ID is the record id (`out:<GHL message id>`, `in:<Cast message id>`) or the bare
message id.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import time
from typing import TYPE_CHECKING, Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from castghld.scheduler import Step

if TYPE_CHECKING:
    from castghld.config import Config
    from castghld.scheduler import StepScheduler
    from castghld.services import Services

log = logging.getLogger("castghld.admin")

SOCKET_NAME = "admin.sock"
RUNTIME_DIRECTORY_ENV = "RUNTIME_DIRECTORY"  # set by systemd for RuntimeDirectory=
MAX_REQUEST_BODY = 4096
MAX_REQUEST_HEADERS = 16 * 1024
LIST_DEFAULT = 100
LIST_MAX = 10_000
ID_PREFIXES = ("out:", "in:")  # record ids: the kind's prefix and the upstream's message id
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
    "status",
    "error_code",
)
TIME_FIELDS = ("received_at", "accepted_at", "sent_at", "report_since")
NUMBER_FIELDS = ("phone", "from", "to")
# What a step running for a message is doing (`castghld outbox show`).
RUNNING = {
    Step.SEND: "sending to Cast now",
    Step.POLL: "asking Cast for its delivery receipt now",
    Step.REPORT: "reporting its status to GHL now",
}


class AdminSocketError(Exception):
    """The admin socket's path is taken by something that is not a socket."""


def runtime_directory() -> str:
    """systemd's `$RUNTIME_DIRECTORY` (its first entry), or ""."""
    return os.environ.get(RUNTIME_DIRECTORY_ENV, "").split(":")[0]


def daemon_socket_path(config: Config) -> str:
    """Where the daemon listens (see the module docstring)."""
    if config.server.admin_socket:
        return config.server.admin_socket
    return os.path.join(runtime_directory() or config.state.dir, SOCKET_NAME)


def iso_time(epoch: Any) -> Any:
    """Epoch seconds as an ISO 8601 UTC time (`2026-12-06T04:38:11Z`); other values unchanged."""
    if not isinstance(epoch, int | float) or isinstance(epoch, bool):
        return epoch
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


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


def detail(
    rid: str, record: dict[str, Any], now: float, scheduler: StepScheduler | None = None
) -> dict[str, Any]:
    """`summary` with the record's shown fields, times in ISO form, and for an outbound
    message where it is: `state` (readable), `attempts`, `last_error`, `next_attempt_at`."""
    out = summary(rid, record, now)
    for name in SHOWN_FIELDS:
        if name in record:
            value = record[name]
            out[name] = list(value) if isinstance(value, tuple) else value
    for name in TIME_FIELDS:
        if record.get(name) is not None:
            out[name] = iso_time(record[name])
    for name in NUMBER_FIELDS:
        if name in record:
            out[name] = mask_number(record[name])
    if "message" in record:
        out["message_chars"] = len(record["message"] or "")
    if record.get("kind") == "outbound" and scheduler is not None:
        out.update(whereabouts(rid, record, scheduler))
    return out


def whereabouts(rid: str, record: dict[str, Any], scheduler: StepScheduler) -> dict[str, Any]:
    """Where an outbound message is, in words (`state`), with its send attempts in this run,
    the last error retried and when its next step is due."""
    tries = record.get("tries", 0)
    out: dict[str, Any] = {"attempts": tries}
    if record.get("last_code"):
        out["last_error"] = (
            f"{record.get('last_status', '-')} {record['last_code']}: {record.get('last_reason')}"
        )
    running = scheduler.running(rid)
    due = scheduler.due(rid)
    if due is not None:
        out["next_attempt_at"] = iso_time(due[0])
    if running is not None:
        out["state"] = RUNNING.get(running, f"{running} running now")
    elif due is not None:
        at, step = iso_time(due[0]), due[1]
        if step == Step.SEND:
            out["state"] = f"waiting to retry send (attempt {tries}, next at {at})"
        elif step == Step.POLL:
            out["state"] = f"sent; waiting for its delivery receipt (next check at {at})"
        elif step == Step.REPORT:
            failures = record.get("report_failures", 0)
            out["state"] = f"waiting to retry its report to GHL (attempt {failures}, next at {at})"
        else:
            out["state"] = f"paused after an unexpected error (goes on at {at})"
    elif scheduler.holds(rid):
        out["state"] = {
            "new": "queued to send (its Cast account's pace decides when)",
            "polling": "queued to ask Cast for its delivery receipt",
        }.get(record.get("stage", ""), "queued to report its status to GHL")
    else:
        out["state"] = "not scheduled: goes on at the next start (or castghld outbox retry)"
    return out


def log_ids(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON fields naming a record in an operator's log line: outbound by GHL's message id,
    inbound by Cast's (as every other line about it)."""
    if record.get("kind") == "inbound":
        ids = {"cast_id": record.get("cast_id")}
    else:
        ids = {"message_id": record.get("message_id")}
    if record.get("location_id"):
        ids["location_id"] = record["location_id"]
    return ids


class AdminHandler(tornado.web.RequestHandler):
    def initialize(self, daemon: Services) -> None:
        self.daemon = daemon

    def reply(self, status: int, doc: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.reply(status_code, {"error": "error", "message": self._reason})

    @property
    def scheduler(self) -> StepScheduler | None:
        """The outbound step scheduler (running steps, the timer heap), if outbound is served."""
        return getattr(self.daemon.outbox.pipelines.get("outbound"), "scheduler", None)

    def resolve(self, given: str) -> str | None:
        """The record id of `given` (a record id, or a bare GHL or Cast message id); None after
        answering 404."""
        records = self.daemon.outbox.records
        for rid in (given, *(prefix + given for prefix in ID_PREFIXES)):
            if rid in records:
                return rid
        self.reply(404, {"error": "not_found", "message": f"no unfinished message {given}"})
        return None


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
    def get(self, given: str) -> None:
        rid = self.resolve(given)
        if rid is not None:
            record = self.daemon.outbox.records[rid]
            self.reply(200, detail(rid, record, time.time(), self.scheduler))


class OutboxActionHandler(AdminHandler):
    async def post(self, given: str, action: str) -> None:
        rid = self.resolve(given)
        if rid is None:
            return
        if action == "retry":
            self.retry(rid)
        else:
            await self.drop(rid)

    def retry(self, rid: str) -> None:
        """Dispatch a message that waits for nothing, or cut its backoff (a send or report
        retry, a receipt check) short; 409 if it is running or queued already."""
        outbox, scheduler = self.daemon.outbox, self.scheduler
        record = outbox.records[rid]
        hurried = scheduler is not None and scheduler.hurry(lambda r, _step: r == rid)
        if not hurried and not outbox.retry(rid):
            running = scheduler.running(rid) if scheduler is not None else None
            why = RUNNING.get(running or "", "is already being sent or waits for its retry")
            if running is None and scheduler is not None and scheduler.holds(rid):
                why = "is queued for its next step already"
            message = f"{rid} {why}; it goes on by itself"
            self.reply(409, {"error": "busy", "message": message})
            return
        log.warning(
            "operator: %s dispatched again%s",
            rid,
            " (its wait cut short)" if hurried else "",
            extra={**log_ids(record), "outcome": "retried", "reason": "operator"},
        )
        self.reply(200, {"id": rid, "outcome": "retried"})

    async def drop(self, rid: str) -> None:
        """Forget the message for good, unless a step of it runs now: a send in flight may be
        taken by Cast whatever we do, so the operator hears that instead of "dropped"."""
        record = self.daemon.outbox.records[rid]
        running = self.scheduler.running(rid) if self.scheduler is not None else None
        if running is not None:
            doing = RUNNING.get(running, running)
            message = (
                f"{rid} is {doing.removesuffix(' now')} (in flight): not dropped; "
                + ("Cast may take it whatever we do; " if running == Step.SEND else "")
                + "try again once it waits (castghld outbox show)"
            )
            self.reply(409, {"error": "in_flight", "message": message})
            return
        await self.daemon.outbox.drop(rid)
        log.warning(
            "operator: %s dropped from the outbox; nothing more is sent or reported for it",
            rid,
            extra={**log_ids(record), "outcome": "dropped", "reason": "operator"},
        )
        self.reply(200, {"id": rid, "outcome": "dropped"})


class RetryWaitingHandler(AdminHandler):
    """`castghld outbox retry --all [--account A] [--location L]`: every send waiting for its
    retry goes now (after a Cast outage the operator knows is over)."""

    def post(self) -> None:
        account = self.get_argument("account", "")
        location = self.get_argument("location", "")
        records = self.daemon.outbox.records

        def wanted(rid: str, step: str) -> bool:
            record = records.get(rid, {})
            return (
                step == Step.SEND
                and (not account or record.get("account") == account)
                and (not location or record.get("location_id") == location)
            )

        hurried = self.scheduler.hurry(wanted) if self.scheduler is not None else []
        if hurried:
            log.warning(
                "operator: %d send retr%s cut short%s%s",
                len(hurried),
                "y" if len(hurried) == 1 else "ies",
                f" account={account}" if account else "",
                f" location={location}" if location else "",
                extra={"outcome": "retried", "reason": "operator", "count": len(hurried)},
            )
        self.reply(200, {"outcome": "retried", "count": len(hurried)})


class ForgetHandler(AdminHandler):
    async def post(self, location_id: str) -> None:
        if not await self.daemon.installations.forget(location_id):
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
    (r"/retry-waiting", RetryWaitingHandler),
    (r"/installs/([^/]+)/forget", ForgetHandler),
    (r"/usage", UsageHandler),
]


class AdminServer:
    """The admin socket of one daemon (see the module docstring)."""

    def __init__(self, daemon: Services):
        self.daemon = daemon
        self.path = daemon_socket_path(daemon.config)
        self._socket: Any = None
        self._server: tornado.httpserver.HTTPServer | None = None

    def bind(self) -> None:
        """Create the socket (0600), before the daemon listens on its port. Something else than
        a socket at its path is `AdminSocketError` (the daemon refuses to start: it would delete
        or shadow a file that is not its own); a path that cannot be bound (a missing directory,
        too long for a unix socket) is logged, not fatal: the daemon serves without the admin
        commands."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:
            mode = None
            log.warning("admin socket %s: %s", self.path, e.strerror)
        if mode is not None and not stat.S_ISSOCK(mode):
            raise AdminSocketError(
                f"admin socket {self.path}: exists and is not a socket; move it away, or set "
                "server.admin_socket to another path"
            )
        try:
            self._socket = tornado.netutil.bind_unix_socket(self.path, mode=0o600)
        except (OSError, ValueError) as e:
            log.warning(
                "no admin socket at %s (%s): castghld outbox/forget unavailable",
                self.path,
                getattr(e, "strerror", None) or e,
            )

    def start(self) -> None:
        """Serve the socket `bind` created."""
        if self._socket is None:
            return
        app = tornado.web.Application(
            [(p, cls, {"daemon": self.daemon}) for p, cls in default_handlers],
            log_function=lambda handler: None,
        )
        self._server = tornado.httpserver.HTTPServer(
            app, max_body_size=MAX_REQUEST_BODY, max_header_size=MAX_REQUEST_HEADERS
        )
        self._server.add_socket(self._socket)

    async def stop(self) -> None:
        if self._socket is None:
            return
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        else:
            self._socket.close()
        self._socket = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

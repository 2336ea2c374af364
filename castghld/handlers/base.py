"""Base handler: JSON errors, the 1 MiB body limit, in-flight accounting, scrubbed access log.

Guarantees:
- Every error answer is ``{"error": "<code>", "message": "<text>"}`` with the right status; an
  unexpected exception is logged with its traceback and answered 500 without one.
- A body over `MAX_BODY_SIZE` is answered 413 (by Content-Length before it is read, or as soon as a
  chunked body passes the limit) and never reaches a handler.
- `self.body` is the exact raw body, as signature checks need it.
- `json_body` answers 400 ``invalid_json`` for a body that is not JSON, not UTF-8 or nested too
  deeply for the parser (``[`` x 100,000), never a 500.
"""

from __future__ import annotations

import http
import json
import logging
import re
from typing import TYPE_CHECKING, Any

import tornado.web

from castghld.log import redact_numbers, scrub

if TYPE_CHECKING:
    from castghld.services import Services

MAX_BODY_SIZE = 1024 * 1024
access_log = logging.getLogger("castghld.access")
app_log = logging.getLogger("castghld.http")

_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal_error",
    502: "bad_gateway",
    503: "unavailable",
}


# GHL ids are short ASCII (``ve9EPM428h8vShlRW1KT``). An id is stored and put into upstream URLs
# only if it is 1-128 characters that stand in a URL path segment as they are (RFC 3986 pchar,
# without "%"), and is not "." or "..": NUL, control and non-ASCII characters, "/", "?", "#" and
# blanks never get past the door.
MAX_ID_CHARS = 128
_ID_RE = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]{1," + str(MAX_ID_CHARS) + "}")
# The app webhook's rule (`url_segment=False`): any printable text up to this length.
MAX_TEXT_ID_CHARS = 200


def usable_id(value: object, *, url_segment: bool = True) -> str | None:
    """`value` as an id we can use, or None. A whole number is read as its decimal form (GHL's
    fields are strings, but an id sent as a number is still that id).

    `url_segment` True (message webhooks, whose ids go into upstream URL paths): the rule above.
    False (app webhooks: ids compared, stored and sent in form bodies and query strings, which
    encode them): printable text of at most `MAX_TEXT_ID_CHARS`, surrounding blanks stripped;
    None when nothing is left. The two rules decide which authentic INSTALL/UNINSTALL and message
    webhooks are acted on, so they stay as they are.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    if not url_segment:
        if len(value) > MAX_TEXT_ID_CHARS or not value.isprintable():
            return None
        return value.strip() or None
    if not _ID_RE.fullmatch(value) or value in (".", ".."):
        return None
    return value


class APIError(tornado.web.HTTPError):
    """An error answer with a machine code and a human message (both shown to the client)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, reason=None)
        self.code = code
        self.message = message


@tornado.web.stream_request_body
class APIHandler(tornado.web.RequestHandler):
    daemon: Services

    def initialize(self, daemon: Services) -> None:
        self.daemon = daemon
        self._chunks: list[bytes] = []
        self._received = 0
        self._too_large = False

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        self.daemon.requests.enter()
        self._counted = True
        length = self.request.headers.get("Content-Length")
        if length is not None:
            try:
                too_large = int(length) > MAX_BODY_SIZE
            except ValueError:
                raise APIError(400, "bad_request", "invalid Content-Length") from None
            if too_large:
                raise APIError(413, "payload_too_large", f"body exceeds {MAX_BODY_SIZE} bytes")

    def data_received(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._received += len(chunk)
        if self._received > MAX_BODY_SIZE:
            self._too_large = True
            self._chunks = []
            return
        self._chunks.append(chunk)

    def on_finish(self) -> None:
        self._uncount()

    def on_connection_close(self) -> None:
        # A client that goes away mid-body never reaches on_finish: the request is over anyway.
        self._uncount()
        super().on_connection_close()

    def _uncount(self) -> None:
        if getattr(self, "_counted", False):
            self.daemon.requests.leave()
            self._counted = False

    def check_body_size(self) -> None:
        """Call first in every method that reads a body (chunked bodies are only known late)."""
        if self._too_large:
            raise APIError(413, "payload_too_large", f"body exceeds {MAX_BODY_SIZE} bytes")

    def json_body(self) -> Any:
        self.check_body_size()
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "invalid_json", "request body is not valid JSON") from None
        except RecursionError:
            raise APIError(400, "invalid_json", "request body is nested too deeply") from None

    def verify_ghl_signature(self, kind: str) -> str:
        """401 unless the raw body carries a valid GHL signature; the scheme that verified."""
        self.check_body_size()
        scheme = self.daemon.verifier.verify(self.body, self.request.headers)
        if scheme is None:
            present = [
                h for h in ("X-GHL-Signature", "X-WH-Signature") if h in self.request.headers
            ]
            # Unsigned junk (scanners) apart from a signature that does not verify: only the
            # latter says GHL's keys or ours are wrong (the CastghldWebhookSignatureFailures alert).
            outcome = "bad_signature" if present else "unsigned"
            self.daemon.metrics.webhooks.labels(kind, outcome).inc()
            raise APIError(
                401,
                "invalid_signature",
                f"{' / '.join(present)} does not verify against GHL's keys"
                if present
                else "missing X-GHL-Signature (or X-WH-Signature) header",
            )
        return scheme

    def signed_json_object(self, kind: str) -> dict[str, Any] | None:
        """The body of an authentic GHL webhook as a JSON object (401 if not authentic); None,
        answered 200 "ignored", if it is not a JSON object: GHL retries every non-2xx and pauses
        an endpoint that fails (SPEC §3), so an authentic body is never refused for its shape."""
        self.verify_ghl_signature(kind)
        try:
            body = self.json_body()
        except APIError as e:
            if e.status_code != 400:
                raise
            self.ignore_unusable(kind, e.message)
            return None
        if not isinstance(body, dict):
            self.ignore_unusable(kind, "body is not a JSON object")
            return None
        return body

    def ignore_unusable(self, kind: str, why: str) -> None:
        """Answer an authentic webhook we cannot use 200 "ignored", counted and logged."""
        self.daemon.metrics.webhooks.labels(kind, "unusable").inc()
        app_log.warning(
            "%s webhook ignored: %s", kind, why, extra={"outcome": "ignored", "reason": why}
        )
        self.write_json(200, {"status": "ignored", "reason": why})

    def write_json(self, status: int, doc: Any) -> None:
        self.set_status(status)
        self.finish(json.dumps(doc))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, APIError):
            code, message = exc.code, exc.message
        else:
            code = _ERROR_CODES.get(status_code, "error")
            try:
                message = http.HTTPStatus(status_code).phrase
            except ValueError:
                message = "error"
            if isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code < 500:
                message = exc.log_message % exc.args if exc.args else exc.log_message
        self.error_answer = (code, message)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"error": code, "message": message}))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, tornado.web.HTTPError):
            if value.status_code >= 500:
                app_log.warning("%s %s: %s", self.request.method, self.request.path, value)
            return
        app_log.error(
            "uncaught exception in %s %s",
            self.request.method,
            self.request.path,
            exc_info=(typ, value, tb),
        )


class NotFoundHandler(APIHandler):
    """Answers every unknown path with a JSON 404, whatever the method."""

    def prepare(self) -> None:
        super().prepare()
        raise APIError(404, "not_found", f"no such path: {self.request.path}")


# `log_fields` a handler may set (ids it validated: short ASCII) and their names in a text line.
ACCESS_ID_NAMES = {"message_id": "message", "location_id": "location", "cast_id": "inbound"}
# Scrapes and probes come every few seconds: answered, they are logged at debug only.
QUIET_ROUTES = frozenset({"/metrics", "/healthz"})


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log line without query values that may carry secrets (OAuth codes, state); an error
    answer's code and message ride along, so the log says why a request was refused (not only
    `401`). Counts the request in `castghld_http_requests_total{route,status}`."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    request = handler.request
    ms = 1000.0 * request.request_time()
    daemon = getattr(handler, "daemon", None)
    if daemon is not None:
        route = daemon.route_of.get(type(handler), "other")
        daemon.metrics.http_requests.labels(route, str(status)).inc()
        if route in QUIET_ROUTES and level == logging.INFO:
            level = logging.DEBUG
    error = getattr(handler, "error_answer", None)
    reason = redact_numbers(f"{error[0]}: {error[1]}") if error else None
    # The ids the handler learned (a webhook's message id): one GHL message id can be followed
    # through the log from its webhook on.
    fields = getattr(handler, "log_fields", None) or {}
    ids = "".join(f" {ACCESS_ID_NAMES[name]}={value}" for name, value in fields.items())
    access_log.log(
        level,
        "%d %s %s remote=%s ms=%.1f%s%s",
        status,
        request.method,
        scrub(request.uri or ""),
        request.remote_ip,
        ms,
        ids,
        f" error={reason}" if reason else "",
        extra={"status": status, "ms": round(ms, 1), "reason": reason, **fields},
    )

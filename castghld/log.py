"""Logging to stderr for journald: one event per line, secrets scrubbed.

Guarantees: whatever a log call passes (message, arguments, exception text), the emitted line has
the values of token-like fields (`access_token`, `refresh_token`, `code`, `client_secret`,
`Authorization`/`Bearer`, `X-API-Key`, ...) replaced by `[secret]`, in every way upstream text
quotes them (`"name": "value"`, `'name': 'value'`, `name=value`, `Name: value`; `-`, `_` or
camelCase), also when the text was cut inside the value. Upstream text that is cut to a length
(`clip`) is scrubbed and its numbers redacted before the cut. Callers still never log secrets on
purpose: this filter is the second line of defence, not the first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import sys
import time

SCRUB_KEYS = (
    "access_token",
    "refresh_token",
    "client_secret",
    "code",
    "state",
    "token",
    "api_key",
    "inbound_secret",
    "password",
)
# 9 to 15 digits, optionally "+"-prefixed and grouped by spaces or dashes: a phone number.
# A "." or ":" right after it is punctuation ("... to 09171234567.", "for +639171234567: ...");
# only one followed by a digit (a decimal, a dotted version, a time) means the digits are part of
# something else.
_PHONE_RE = re.compile(r"(?<![\w.])\+?\d(?:[ -]?\d){8,14}(?!\w|[.:]\d)")


def redact_numbers(text: str) -> str:
    """`text` with phone numbers replaced by ``[number]``: upstream error messages may echo the
    number they refused, and logs and metrics must stay free of personal data."""
    return _PHONE_RE.sub("[number]", text)


# Line breaks and other control characters (but tab): upstream text (Cast's and GHL's error
# messages) must not start a line of its own that looks like one of ours.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters written as escapes (``\\n``)."""
    return _CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


def no_answer_reason(error: BaseException | None) -> str:
    """Why a request got no HTTP answer, for logs and errors: the exception's type and its own
    one-line text (libcurl's: "Could not resolve host: ...", "SSL certificate problem: ...",
    "Operation timed out after 5001 milliseconds ..."): it names hosts, never a header or a body."""
    name = type(error).__name__
    text = getattr(error, "message", None) or getattr(error, "strerror", None) or ""
    if not text or text == name:
        return name
    return f"{name} ({one_line(clip(str(text), 200))})"


# libcurl's error numbers of a TLS failure (handshake, certificate not trusted or for another
# name, CA file): such a request reached a server, which did not prove who it is.
CURL_TLS_ERRORS = frozenset({35, 51, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98})


def is_tls_failure(error: BaseException | None) -> bool:
    """Whether a request without an HTTP answer failed in the TLS layer, not for want of a peer:
    libcurl's TLS error numbers (`CurlError.errno`) or Python's `ssl.SSLError`."""
    if isinstance(error, ssl.SSLError):
        return True
    return type(error).__name__ == "CurlError" and getattr(error, "errno", None) in CURL_TLS_ERRORS


def unanswered(upstream: str, error: BaseException | None) -> str:
    """Why a request to `upstream` ("Cast", "GHL") got no HTTP answer: "no answer from Cast: ...",
    or, when TLS failed (a name mismatch, an untrusted certificate), "no trusted TLS connection
    to Cast: ...": the server was reached and did not prove it is `upstream`."""
    if is_tls_failure(error):
        return f"no trusted TLS connection to {upstream}: {no_answer_reason(error)}"
    return f"no answer from {upstream}: {no_answer_reason(error)}"


def clip(text: str, limit: int) -> str:
    """Upstream text cut to `limit` characters for a log line or an error report, scrubbed and
    its numbers redacted first: a cut through a secret or a number leaves a piece that the
    patterns (a number needs 9 digits) or an exact match of a known secret no longer find."""
    return redact_numbers(scrub(text))[:limit]


def _spellings(name: str) -> str:
    """`access_token` as a pattern that also matches access-token, accessToken, ACCESS_TOKEN."""
    return re.escape(name).replace("_", "[-_]?")


# The names whose value is a secret, longest first so the longest spelling wins.
_SECRET_NAMES = sorted(
    {_spellings(n) for n in (*SCRUB_KEYS, "x_api_key", "authorization")}, key=len, reverse=True
)
_NAMED_RE = re.compile(
    # Not after a dot: "castghld.state: ..." is a logger's name before its message, not a name
    # and its value.
    r"(?i)(?P<head>(?<!\.)\b(?:" + "|".join(_SECRET_NAMES) + r")\b"
    # The name's closing quote (JSON, a Python repr, JSON inside a JSON string), the separator,
    # the value's opening quote.
    r"\\?[\"']?\s*[:=]\s*(?:\\?(?P<quote>[\"']))?)"
    # A quoted value runs to its closing quote, or to the end of the line or the text when a cut
    # took the quote away; an unquoted one to a delimiter, an auth scheme with its credential.
    r"(?(quote)(?:(?!\\?(?P=quote))[^\r\n])+|(?:(?:bearer|basic)\s+)?[^\s&\"',}]+)"
)
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")


# Every pattern above needs one of these words (case-insensitively): a line without any of them
# (most lines: access lines, outcomes) is returned as it is without running the patterns.
_TRIGGERS = (
    "bearer",
    "authorization",
    "token",
    "secret",
    "api_key",
    "api-key",
    "apikey",
    "code",
    "state",
    "password",
)
# The non-ASCII letters that `re.IGNORECASE` matches to an ASCII one but `str.lower` does not
# turn into it (U+0130 and U+0131 -> i, U+017F long s -> s, U+212A Kelvin sign -> k).
_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def scrub(text: str) -> str:
    lowered = text.lower() if text.isascii() else text.translate(_FOLD).lower()
    if not any(word in lowered for word in _TRIGGERS):
        return text
    return _scrub_by_patterns(text)


def _scrub_by_patterns(text: str) -> str:
    """`scrub` without its fast path: every pattern run on `text`."""
    text = _BEARER_RE.sub(r"\1[secret]", text)
    return _NAMED_RE.sub(r"\g<head>[secret]", text)


# Context a log call may pass as `extra={...}`; the JSON format emits each as a field of its own so
# `jq 'select(.location_id == "...")'` works. Values are scrubbed and phone numbers redacted like
# the message; a key outside this list is not emitted (an accidental `extra={"token": ...}` stays
# out of the log).
FIELDS = (
    "message_id",
    "location_id",
    "company_id",
    "cast_id",
    "kind",
    "outcome",
    "reason",
    "status",
    "error_code",
    "attempt",
    "ms",
)
# syslog priorities of sd-daemon(3) prefixes: journald files "<3>..." at priority err.
PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _clean(value: object) -> object:
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact_numbers(scrub(str(value)))


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


def journal_priority(level: int) -> int:
    """The syslog priority of a logging level (levels between two named ones round up)."""
    for named in sorted(PRIORITIES):
        if level <= named:
            return PRIORITIES[named]
    return PRIORITIES[logging.CRITICAL]


class _TextFormatter(logging.Formatter):
    """`LEVEL logger: message`; under journald with a `<N>` priority prefix and no timestamp (the
    journal has its own), elsewhere with a UTC timestamp."""

    def __init__(self, journal: bool):
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The event itself is one line whatever its arguments hold; only a traceback (appended
        # after this) spans lines. Scrubbed before the escaping: a line break written as a
        # backslash and "n" right before a secret's name would hide it from the patterns.
        return one_line(scrub(super().formatMessage(record)))

    def format(self, record: logging.LogRecord) -> str:
        text = scrub(super().format(record))
        if self.journal:
            prefix = f"<{journal_priority(record.levelno)}>"
            return prefix + text.replace("\n", "\n" + prefix)
        return f"{_timestamp(record)} {text}"


class _JSONFormatter(logging.Formatter):
    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                event[name] = _clean(value)
        if record.exc_info:
            event["exc"] = scrub(self.formatException(record.exc_info))
        line = json.dumps(event, ensure_ascii=False)
        return f"<{journal_priority(record.levelno)}>{line}" if self.journal else line


def stderr_is_journal() -> bool:
    """Whether stderr is connected to journald: `$JOURNAL_STREAM` ("DEV:INODE", set by systemd)
    names the stream and stderr is still that stream (not redirected by a wrapper)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger (again, on reload): stderr, scrubbed, text or JSON lines, with
    journald priority prefixes when stderr is the journal."""
    journal = stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter(journal) if fmt == "json" else _TextFormatter(journal))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

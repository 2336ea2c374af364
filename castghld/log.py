"""Logging to stderr for journald: one event per line, secrets scrubbed.

Guarantees: whatever a log call passes (message, arguments, exception text), the emitted line has
the values of token-like fields (`access_token`, `refresh_token`, `code`, `client_secret`,
`Authorization`/`Bearer`, `X-API-Key`, ...) replaced by `[secret]`. Callers still never log secrets
on purpose: this filter is the second line of defence, not the first.
"""

from __future__ import annotations

import json
import logging
import re
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
_PHONE_RE = re.compile(r"(?<![\w.])\+?\d(?:[ -]?\d){8,14}(?![\w.:])")


def redact_numbers(text: str) -> str:
    """`text` with phone numbers replaced by ``[number]``: upstream error messages may echo the
    number they refused, and logs and metrics must stay free of personal data."""
    return _PHONE_RE.sub("[number]", text)


_KV_RE = re.compile(
    r"(?i)([\"']?\b(?:" + "|".join(SCRUB_KEYS) + r")\b[\"']?\s*[=:]\s*[\"']?)([^\s&\"',}]+)"
)
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
_HEADER_RE = re.compile(r"(?i)\b(x-api-key|authorization)(\s*[:=]\s*)[^\s,}]+")


def scrub(text: str) -> str:
    text = _BEARER_RE.sub(r"\1[secret]", text)
    text = _HEADER_RE.sub(r"\1\2[secret]", text)
    return _KV_RE.sub(r"\1[secret]", text)


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        if record.exc_info:
            event["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(event, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once: stderr, scrubbed, text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(_ScrubbingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

"""`castghld check-config --online`: ask GHL and Cast whether the configured credentials work.

Guarantees:
- No side effect upstream: GHL is asked to exchange a made-up authorization code (nothing is
  issued), Cast is asked the delivery status of a made-up message id (nothing is sent, nothing is
  charged). No SMS is sent and no token is stored.
- One line per check, ``ok|FAIL|WARN <what>: <detail>``; never a secret, nor a piece of one that
  a cut of an upstream's text left (a Cast key is named by its config key and its account name,
  ``acct-`` + 10 hex digits of its SHA-256, as in the logs).
- Each request gets one attempt of at most `TIMEOUT` seconds: an upstream that does not answer is
  a FAIL naming its host, not a retry loop.

How each answer is read (GHL does not enumerate the errors of ``POST /oauth/token``; the Cast API
of SPEC §5 has no account, balance or sender-ID endpoint, and the public copy of Cast's reference
describes sending only, so a key is proven through a status lookup):
- GHL: the form carries the real client_id/client_secret and a made-up code. ``invalid_grant`` (or
  another 400/422 JSON error that does not name the client) means GHL authenticated the client and
  refused only the code: the credentials are accepted. ``invalid_client``, any 401, or an answer
  whose text names the client means GHL rejected client_id/client_secret. An answer without a JSON
  error (empty, HTML, a 3xx: redirects are never followed) or a success proves nothing: FAIL.
- Cast: an error answer of Cast's shape (a JSON object with an ``error_code``) other than 401/403
  to the status lookup (404 for the unknown id) means the key was accepted; 401
  ``INVALID_API_KEY`` / 403 ``API_KEY_REVOKED`` ... fail with Cast's code. Any other answer (a
  proxy's page, an empty body, another service's JSON, a 2xx without ``success: true``) proves
  nothing: FAIL, transient only for 429/5xx.
- sender_id: Cast can only tell whether a sender ID is approved by sending; the check says so
  (WARN) instead of pretending.
"""

from __future__ import annotations

import dataclasses
import secrets
from urllib.parse import urlsplit

from castghld.cast import CastAccount, CastClient, CastError
from castghld.config import Config
from castghld.ghl import GHLClient, GHLError
from castghld.log import one_line, redact_numbers, scrub
from castghld.metrics import Metrics
from castghld.retry import RETRYABLE_STATUSES

TIMEOUT = 5.0  # seconds per upstream request


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One line of the online check. `transient`: a FAIL a later try may not meet (no answer,
    429, 5xx) rather than a refused credential."""

    level: str  # "ok", "FAIL" or "WARN"
    what: str
    detail: str
    transient: bool = False

    def __str__(self) -> str:
        return f"{self.level} {self.what}: {self.detail}"


async def online_checks(config: Config) -> list[CheckResult]:
    """Every online check, in order: GHL client credentials, each Cast key, each sender ID. Each
    detail is one line without a configured secret, whatever an upstream put in its answer."""
    metrics = Metrics()
    results = [await check_ghl_client(config, GHLClient(config, metrics))]
    cast = CastClient(config, metrics)
    for where, account in cast_accounts(config):
        results.append(await check_cast_key(config, cast, where, account))
    results += sender_id_notes(config)
    return [dataclasses.replace(r, detail=_printable(config, r.detail)) for r in results]


# The shortest head of a configured secret that is hidden on its own. The clients cut an
# upstream's error text (to 500 characters) before it gets here, and the log patterns do not see
# a secret echoed without its name: a cut through one leaves its head, which an exact match of
# the whole secret does not find.
SECRET_HEAD = 8


def _printable(config: Config, text: str) -> str:
    """`text` (which may quote an upstream's answer: an echo of our request, a line break, a
    phone number) on one line, scrubbed like a log line, numbers redacted, with every configured
    secret, and every head of one at least `SECRET_HEAD` characters long, replaced by
    ``[secret]``."""
    cast = config.cast
    values = [config.ghl.client_secret.value, cast.api_key.value, cast.inbound_secret.value]
    values += [o.api_key.value for o in cast.locations.values() if o.api_key is not None]
    for value in sorted(filter(None, values), key=len, reverse=True):
        text = _hide(text, value)
    return one_line(redact_numbers(scrub(text)))  # escaping last: it would hide what follows


def _hide(text: str, secret: str) -> str:
    """`text` with `secret`, and any head of it `SECRET_HEAD` characters or longer, replaced."""
    head = secret[:SECRET_HEAD]
    pieces = []
    start = 0
    while (found := text.find(head, start)) >= 0:
        end = found + len(head)
        while end < len(text) and end - found < len(secret) and text[end] == secret[end - found]:
            end += 1
        pieces += [text[start:found], "[secret]"]
        start = end
    return "".join(pieces) + text[start:]


def cast_accounts(config: Config) -> list[tuple[str, CastAccount]]:
    """(config key, account) of the default Cast key and of each location's own key, each key
    once (the first config key that names it)."""
    cast = config.cast
    found = [("cast.api_key", CastAccount(cast.api_key.value, cast.sender_id))]
    for location_id, override in sorted(cast.locations.items()):
        if override.api_key is not None:
            sender_id = override.sender_id if override.sender_id is not None else cast.sender_id
            account = CastAccount(override.api_key.value, sender_id)
            found.append((f"cast.locations.{location_id}.api_key", account))
    seen: set[str] = set()
    unique = []
    for where, account in found:
        if account.name not in seen:
            seen.add(account.name)
            unique.append((where, account))
    return unique


async def check_ghl_client(config: Config, ghl: GHLClient) -> CheckResult:
    what = f"GHL client credentials (ghl.client_id {config.ghl.client_id})"
    host = urlsplit(config.ghl.api_base).netloc
    code = "castghld-check-config-" + secrets.token_hex(16)
    try:
        await ghl.exchange_code(code)
    except GHLError as e:
        answer = f"{e.status} {e.oauth_error + ': ' if e.oauth_error else ''}{e.message}"
        if e.status == 599:
            return CheckResult("FAIL", what, _no_answer(host, e.message), True)
        if e.oauth_error == "invalid_client" or e.status == 401:
            return CheckResult("FAIL", what, f"GHL rejected client_id/client_secret ({answer})")
        if not isinstance(e.body, dict) or not e.body:
            # An empty or HTML answer (a proxy, a wrong api_base) says nothing about the client.
            return CheckResult(
                "FAIL",
                what,
                f"{host} answered {answer} without GHL's JSON error; the credentials were not "
                "checked",
                e.retryable,
            )
        if e.oauth_error == "invalid_grant" or (
            e.status in (400, 422) and "client" not in e.message.lower()
        ):
            return CheckResult(
                "ok", what, f"accepted by {host} (a made-up authorization code got {answer})"
            )
        if e.status == 400:  # a 400 without an OAuth code whose text names the client
            return CheckResult("FAIL", what, f"GHL rejected client_id/client_secret ({answer})")
        return CheckResult(
            "FAIL", what, f"{host} answered {answer}; the credentials were not checked", e.retryable
        )
    return CheckResult(
        "FAIL",
        what,
        f"{host} answered a made-up authorization code with success: not GHL's token endpoint? "
        "the credentials were not checked",
    )


async def check_cast_key(
    config: Config, cast: CastClient, where: str, account: CastAccount
) -> CheckResult:
    what = f"Cast key {where} ({account.name})"
    host = urlsplit(config.cast.api_base).netloc
    made_up = "CASTGHLD-CHECK-" + secrets.token_hex(12).upper()
    try:
        answer = await cast.status(account, made_up)
    except CastError as e:
        answer = f"{e.http_status} {e.code} {e.message}"
        if e.status == 599:
            return CheckResult("FAIL", what, _no_answer(host, e.message), True)
        if e.status in (401, 403):
            return CheckResult("FAIL", what, f"Cast refused the key: {answer}")
        if e.status == 402:
            return CheckResult("WARN", what, f"accepted by {host}, but sends will fail: {answer}")
        # Only Cast's own error answer (a JSON object with its error_code) proves the key: not a
        # proxy's page, an empty body or a JSON answer of some other service.
        if e.retryable or e.code == "BAD_ANSWER" or e.code.startswith("HTTP_"):
            return CheckResult(
                "FAIL",
                what,
                f"{host} answered {answer}; the key was not checked",
                e.http_status in RETRYABLE_STATUSES,
            )
        return CheckResult(
            "ok", what, f"accepted by {host} (a made-up message id got {e.status} {e.code})"
        )
    if answer.get("success") is not True:
        # Cast's answers say success: true; `{}` is any JSON service behind a wrong api_base.
        return CheckResult(
            "FAIL",
            what,
            f"{host} answered 2xx without Cast's success: true; the key was not checked",
        )
    return CheckResult("ok", what, f"accepted by {host}")


def _no_answer(host: str, message: str) -> str:
    """`message` is the client's "no answer from ...: <exception type> (<its text>)", or its
    "no trusted TLS connection to ...: ..." (answered at once: no wait to speak of)."""
    reason = message.split(": ", 1)[-1]
    if message.startswith("no trusted TLS connection"):
        return f"no trusted TLS connection to {host}: {reason}"
    return f"no answer from {host} (waited at most {TIMEOUT:.0f} s: {reason})"


def sender_id_notes(config: Config) -> list[CheckResult]:
    """A WARN per configured sender ID: approval is only known when Cast takes or refuses a send."""
    cast = config.cast
    where_of: dict[str, list[str]] = {}
    if cast.sender_id:
        where_of.setdefault(cast.sender_id, []).append("cast.sender_id")
    for location_id, override in sorted(cast.locations.items()):
        if override.sender_id:
            where_of.setdefault(override.sender_id, []).append(
                f"cast.locations.{location_id}.sender_id"
            )
    notes = [
        CheckResult(
            "WARN",
            f"sender_id {sender_id!r} ({', '.join(keys)})",
            "Cast has no documented way to check approval without sending; the first send "
            "checks it (a refusal is logged as 'Cast refused message=...' with Cast's error_code "
            "and reported failed to GHL)",
        )
        for sender_id, keys in where_of.items()
    ]
    if not cast.sender_id:
        notes.append(
            CheckResult(
                "WARN",
                "sender_id (cast.sender_id)",
                "not set: Cast sends with the account's assigned sender ID",
            )
        )
    return notes

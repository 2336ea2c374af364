"""`castghld check-config --online`: ask GHL and Cast whether the configured credentials work.

Guarantees:
- No side effect upstream: GHL is asked to exchange a made-up authorization code (nothing is
  issued), Cast is asked the delivery status of a made-up message id and reads of its account
  (nothing is sent, nothing is charged). No SMS is sent and no token is stored.
- One line per check, ``ok|FAIL|WARN <what>: <detail>``; never a secret, nor a piece of one that
  a cut of an upstream's text left (a Cast key is named by its config key and its account name,
  ``acct-`` + 10 hex digits of its SHA-256, as in the logs).
- Each request gets one attempt of at most `TIMEOUT` seconds: an upstream that does not answer is
  a FAIL naming its host, not a retry loop.

How each answer is read (GHL does not enumerate the errors of ``POST /oauth/token``; a Cast key is
proven through a status lookup, which every key may make):
- GHL: the form carries the real client_id/client_secret and a made-up code. ``invalid_grant`` (or
  another 400/422 JSON error that does not name the client) means GHL authenticated the client and
  refused only the code: the credentials are accepted. ``invalid_client``, any 401, or an answer
  whose text names the client means GHL rejected client_id/client_secret. An answer without a JSON
  error (empty, HTML, a 3xx: redirects are never followed) or a success proves nothing: FAIL.
- Cast key: an error answer of Cast's shape (a JSON object with an ``error_code``) other than
  401/403 to the status lookup (404 for the unknown id) means the key was accepted; 401
  ``INVALID_API_KEY`` / 403 ``API_KEY_REVOKED`` ... fail with Cast's code. Any other answer (a
  proxy's page, an empty body, another service's JSON, a 2xx without ``success: true``) proves
  nothing: FAIL, transient only for 429/5xx. A sandbox key (``cast_test_...``) is a WARN.
- Cast account, for each accepted key (``/api/v1/account/balance``, ``profile``,
  ``sender-ids``): its balance, billing type and allowed channels are printed; FAIL when it is
  inactive or ``sms`` is not an allowed channel.
- sender_id, per configured (account, sender ID): FAIL unless the account lists it approved for
  the ``sms`` channel; not set: ok when the account has exactly one approved (Cast uses it), WARN
  otherwise.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any
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
    approved: dict[str, list[dict[str, Any]] | None] = {}
    for where, account in cast_accounts(config):
        key_result = await check_cast_key(config, cast, where, account)
        results.append(key_result)
        if account.sandbox:
            results.append(
                CheckResult(
                    "WARN",
                    key_result.what,
                    "a sandbox key: Cast delivers nothing and charges nothing",
                )
            )
        if key_result.level != "FAIL":
            account_result, approved[account.name] = await check_cast_account(cast, where, account)
            results.append(account_result)
    results += sender_id_checks(config, approved)
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
    found = [("cast.api_key", CastAccount(cast.api_key.value, cast.sender_id, cast.account))]
    for location_id, override in sorted(cast.locations.items()):
        if override.api_key is not None:
            sender_id = override.sender_id if override.sender_id is not None else cast.sender_id
            account = CastAccount(override.api_key.value, sender_id, override.account)
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


def _sender_pairs(config: Config) -> dict[tuple[str, str], list[str]]:
    """(account name, sender ID) -> the config keys that make a location send so."""
    cast = config.cast
    default = CastAccount(cast.api_key.value, cast.sender_id, cast.account)
    pairs: dict[tuple[str, str], list[str]] = {(default.name, cast.sender_id): ["cast.sender_id"]}
    for location_id, override in sorted(cast.locations.items()):
        name = default.name
        if override.api_key is not None:
            name = CastAccount(override.api_key.value, "", override.account).name
        sender_id = override.sender_id if override.sender_id is not None else cast.sender_id
        where = f"cast.locations.{location_id}"
        where += ".sender_id" if override.sender_id is not None else ".api_key"
        pairs.setdefault((name, sender_id), []).append(where)
    return pairs


async def check_cast_account(
    cast: CastClient, where: str, account: CastAccount
) -> tuple[CheckResult, list[dict[str, Any]] | None]:
    """The account behind an accepted key: balance, billing type, channels (FAIL when it is
    inactive or may not send SMS); and its approved sender IDs (None if Cast did not list
    them)."""
    what = f"Cast account {account.name} ({where})"
    try:
        balance = await cast.account_info(account, "balance")
        profile = await cast.account_info(account, "profile")
        listed = await cast.account_info(account, "sender-ids")
    except CastError as e:
        detail = f"cannot read the account: {e.http_status} {e.code} {e.message}"
        return CheckResult("FAIL", what, detail, e.http_status in RETRYABLE_STATUSES), None
    channels = profile.get("allowed_channels")
    channels = [str(c) for c in channels] if isinstance(channels, list) else []
    detail = (
        f"{balance.get('credits', '?')} credits {balance.get('currency') or ''}".rstrip()
        + f", billing {profile.get('billing_type') or 'unknown'}, channels "
        + (", ".join(channels) or "none")
    )
    sender_ids = listed.get("sender_ids")
    approved = (
        [s for s in sender_ids if isinstance(s, dict)] if isinstance(sender_ids, list) else None
    )
    if profile.get("is_active") is False:
        return CheckResult("FAIL", what, detail + "; the account is inactive"), approved
    if "sms" not in channels:
        return CheckResult("FAIL", what, detail + "; sms is not an allowed channel"), approved
    return CheckResult("ok", what, detail), approved


def sender_id_checks(
    config: Config, approved: dict[str, list[dict[str, Any]] | None]
) -> list[CheckResult]:
    """Per configured (account, sender ID): FAIL unless Cast lists it approved for ``sms``;
    unset, ok when the account has exactly one (Cast uses it), else WARN. `approved`: each
    account whose key was accepted, with its sender IDs (None: not listed)."""
    results = []
    for (name, sender_id), keys in _sender_pairs(config).items():
        if name not in approved:
            continue  # the key was refused: its line says why
        listed = approved[name]
        what = (
            f"sender_id {sender_id!r} ({', '.join(keys)})"
            if sender_id
            else (f"sender_id ({', '.join(keys)})")
        )
        if listed is None:
            results.append(CheckResult("FAIL", what, f"{name}'s sender IDs were not listed"))
            continue
        sms = [str(s.get("sender_id")) for s in listed if s.get("channel") == "sms"]
        if not sender_id:
            if len(sms) == 1:
                detail = f"not set: Cast sends with {name}'s only approved sender ID {sms[0]!r}"
                results.append(CheckResult("ok", what, detail))
            else:
                detail = (
                    f"not set, and {name} has {len(sms)} approved sms sender IDs"
                    + (f" ({', '.join(sms)})" if sms else "")
                    + ": Cast picks the account's default or refuses the send"
                )
                results.append(CheckResult("WARN", what, detail))
        elif sender_id in sms:
            results.append(CheckResult("ok", what, f"approved for sms on {name}"))
        else:
            other = [str(s.get("channel")) for s in listed if s.get("sender_id") == sender_id]
            why = (
                f"approved on {name} for {', '.join(other)} only, not sms"
                if other
                else f"not approved on {name} (approved for sms: {', '.join(sms) or 'none'})"
            )
            results.append(CheckResult("FAIL", what, why + "; Cast would refuse its sends"))
    return results

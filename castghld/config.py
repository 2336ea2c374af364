"""Load and validate castghld's YAML config into frozen dataclasses.

Guarantees:
- A config that loads is complete and typed: every later module reads attributes, never raw dicts.
- A key the schema does not define is an error, so a typo is never silently ignored.
- Every problem is reported, not just the first: `ConfigError.problems` holds one line each, of the
  form ``FILE: key.path: what is wrong``; the CLI prints them and exits 2.
- Any string may be ``${ENV_VAR}`` (or contain it); an unset variable is an error.
- Every secret may be inline or ``<name>_file: PATH``; a secret file readable by group or others
  is refused. Secret values are wrapped in `Secret`, whose repr never shows the value.
- Relative paths are resolved against the directory of the config file, so the daemon does not
  depend on its working directory.

Here: the schema (one frozen dataclass per section) and `build_config`, one builder per section;
how a single value is read and checked (types, ``${ENV}``, secret files) is `config_values`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from phonenumbers import SUPPORTED_REGIONS

from castghld.config_values import Reader, Secret, StrictLoader, parse_duration
from castghld.phone import route_key

# A send may be retried until this long after GHL handed us the message; a later attempt could
# fall outside Cast's 24 h idempotency window and send twice (see castghld/outbound/send.py).
MAX_SEND_DEADLINE = 12 * 3600.0
# GSM alphanumeric sender IDs: Cast's API takes 20 characters, but carriers cut them at 11.
MAX_SENDER_ID = 11
DEFAULT_CONFIG_PATH = "/etc/castghld/castghld.yaml"
CONFIG_ENV = "CASTGHLD_CONFIG"
NO_SECRET = Secret("")  # the default of a secret not given (frozen: one instance serves all)
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._-]{1,40}")
DEFAULT_ACCOUNT_NAME = re.compile(r"acct-[0-9a-f]{10}")


class ConfigError(Exception):
    """One or more problems in the config; each is a complete, printable line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    xheaders: bool = True
    shutdown_timeout: float = 20.0
    admin_socket: str = ""  # "": $RUNTIME_DIRECTORY/admin.sock, else <state.dir>/admin.sock


@dataclass(frozen=True)
class GHLConfig:
    client_id: str = ""
    client_secret: Secret = NO_SECRET
    api_base: str = "https://services.leadconnectorhq.com"
    auth_base: str = "https://marketplace.gohighlevel.com"
    webhook_public_keys: tuple[str, ...] = ()
    conversation_provider_id: str = ""
    app_id: str = ""  # "" in the file: the part of client_id before the first "-" (resolved here)
    accept_legacy_rsa: bool = True


@dataclass(frozen=True)
class CastLocationConfig:
    api_key: Secret | None = None
    account: str = ""  # the name of `api_key`'s Cast account ("": the key's hash)
    sender_id: str | None = None
    inbound_numbers: tuple[str, ...] = ()


@dataclass(frozen=True)
class CastConfig:
    api_base: str = "https://api.cast.ph"
    api_key: Secret = NO_SECRET
    account: str = ""  # the name of `api_key`'s Cast account ("": the key's hash)
    sender_id: str = ""
    messages_per_second: int = 10
    requests_per_second: int = 30
    inbound_secret: Secret = NO_SECRET
    locations: Mapping[str, CastLocationConfig] = field(default_factory=dict)
    balance_interval: float = 300.0  # how often each account's credits are read (castghld.credits)


@dataclass(frozen=True)
class StateConfig:
    dir: str = "/var/lib/castghld"
    key_file: str = "/etc/castghld/state.key"


@dataclass(frozen=True)
class TokensConfig:
    refresh_interval: float = 300.0
    refresh_margin: float = 6 * 3600.0
    reconcile_interval: float = 3600.0


@dataclass(frozen=True)
class DeliveryConfig:
    send_deadline: float = 3600.0
    report_deadline: float = 3600.0
    status_polls: tuple[float, ...] = (5, 15, 30, 60, 120, 300, 600, 1800, 3600)
    allowed_regions: tuple[str, ...] = ("PH",)
    concurrency: int = 32
    seen_retention: float = 30 * 86400.0
    inbound_max_age: float = 7 * 86400.0
    request_timeout: float = 10.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    ghl: GHLConfig
    cast: CastConfig
    state: StateConfig
    tokens: TokensConfig = TokensConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    logging: LoggingConfig = LoggingConfig()
    # Loaded without secrets (`load_config(secrets=False)`): key path -> the problem of a value
    # that names an unset ${VAR}, for the command that uses the key to `require`.
    unresolved: Mapping[str, str] = field(default_factory=dict)

    def require(self, *keys: str) -> None:
        """ConfigError if `state.dir`, `server.admin_socket` or one of `keys` could not be
        resolved (a config loaded without secrets): the operator commands use those."""
        needed = ("state.dir", "server.admin_socket", *keys)
        problems = [line for key, line in self.unresolved.items() if key in needed]
        if problems:
            raise ConfigError(problems)

    @property
    def redirect_uri(self) -> str:
        return self.server.public_url.rstrip("/") + "/oauth/callback"


@functools.lru_cache(maxsize=256)
def default_account_name(api_key: str) -> str:
    """The name of an unnamed Cast account: a hash of its key (not secret, stable per key)."""
    return "acct-" + hashlib.sha256(api_key.encode()).hexdigest()[:10]


def default_config_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _with_file_variants(names: set[str], secrets: set[str]) -> set[str]:
    return names | {f"{s}_file" for s in secrets}


def load_config(path: str, secrets: bool = True) -> Config:
    """Read, interpolate and validate the config at `path`; ConfigError lists every problem.

    `secrets=False` is for the commands that need only paths (`outbox`, `forget`, `installs`):
    secrets are neither required nor read (an operator runs those commands outside the unit's
    `$CREDENTIALS_DIRECTORY`) and a value naming an unset variable is left to `Config.require`;
    every other problem (an unknown key, a bad value) is still an error."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file does not exist (use --config PATH)"]) from None
    except PermissionError:
        raise ConfigError(
            [
                f"{path}: cannot read config file: permission denied; the service user must "
                f"read it: chmod 644 {path} (it holds no secret when they are *_file "
                "credentials) and chmod 755 its directory"
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read config file: {e}"]) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        what = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{path}: invalid YAML{line}: {what}"]) from None
    return build_config(path, raw if raw is not None else {}, secrets)


def build_config(path: str, raw: Any, secrets: bool = True) -> Config:
    """The Config of the parsed YAML `raw` read from `path`; ConfigError lists every problem."""
    r = Reader(path, secrets)
    sections = {"server", "ghl", "cast", "state", "tokens", "delivery", "logging"}
    top = r.section("", raw, sections)
    server = _server(r, top.get("server"))
    ghl = _ghl(r, top.get("ghl"))
    cast = _cast(r, top.get("cast"))
    _check_accounts(r, cast)
    state = _state(r, top.get("state"))
    tokens = _tokens(r, top.get("tokens"))
    delivery = _delivery(r, top.get("delivery"))
    logging_cfg = _logging(r, top.get("logging"))
    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        path=os.path.abspath(path),
        server=server,
        ghl=ghl,
        cast=cast,
        state=state,
        tokens=tokens,
        delivery=delivery,
        logging=logging_cfg,
        unresolved=r.unresolved,
    )


def _server(r: Reader, raw: Any) -> ServerConfig:
    s = r.section("server", raw, _fields(ServerConfig))
    server = ServerConfig(
        host=r.string("server", s, "host", ServerConfig.host),
        port=r.integer("server", s, "port", ServerConfig.port, 0, 65535),
        public_url=r.url("server", s, "public_url", "", required=True),
        xheaders=r.boolean("server", s, "xheaders", ServerConfig.xheaders),
        shutdown_timeout=r.duration("server", s, "shutdown_timeout", 20.0, minimum=1),
        admin_socket=r.path_value("server", s, "admin_socket", ""),
    )
    if not server.host.strip():
        r.problem("server.host", "must not be empty (write 0.0.0.0 to listen on every interface)")
    return server


def _ghl(r: Reader, raw: Any) -> GHLConfig:
    g = r.section("ghl", raw, _with_file_variants(_fields(GHLConfig), {"client_secret"}))
    client_id = r.string("ghl", g, "client_id")
    if not client_id:
        r.problem("ghl.client_id", "is required (from the GHL marketplace app settings)")
    return GHLConfig(
        client_id=client_id,
        client_secret=r.secret("ghl", g, "client_secret", required=True) or Secret(""),
        api_base=r.url("ghl", g, "api_base", GHLConfig.api_base),
        auth_base=r.url("ghl", g, "auth_base", GHLConfig.auth_base),
        webhook_public_keys=tuple(
            os.path.join(r.base_dir, p) for p in r.string_list("ghl", g, "webhook_public_keys")
        ),
        conversation_provider_id=r.string("ghl", g, "conversation_provider_id"),
        app_id=r.string("ghl", g, "app_id") or client_id.split("-", 1)[0],
        accept_legacy_rsa=r.boolean("ghl", g, "accept_legacy_rsa", True),
    )


def _cast(r: Reader, raw: Any) -> CastConfig:
    c = r.section(
        "cast", raw, _with_file_variants(_fields(CastConfig), {"api_key", "inbound_secret"})
    )
    return CastConfig(
        api_base=r.url("cast", c, "api_base", CastConfig.api_base),
        api_key=r.secret("cast", c, "api_key", required=True) or Secret(""),
        account=_account_name(r, "cast", c),
        sender_id=_sender_id(r, "cast", c),
        messages_per_second=r.integer("cast", c, "messages_per_second", 10, 1, 10000),
        requests_per_second=r.integer("cast", c, "requests_per_second", 30, 1, 10000),
        inbound_secret=r.secret("cast", c, "inbound_secret", required=True) or Secret(""),
        locations=_cast_locations(r, c.get("locations")),
        balance_interval=r.duration("cast", c, "balance_interval", 300.0, minimum=1),
    )


def _state(r: Reader, raw: Any) -> StateConfig:
    st = r.section("state", raw, _fields(StateConfig))
    return StateConfig(
        dir=r.path_value("state", st, "dir", StateConfig.dir),
        key_file=r.path_value("state", st, "key_file", StateConfig.key_file),
    )


def _tokens(r: Reader, raw: Any) -> TokensConfig:
    t = r.section("tokens", raw, _fields(TokensConfig))
    return TokensConfig(
        refresh_interval=r.duration("tokens", t, "refresh_interval", 300.0, minimum=1),
        refresh_margin=r.duration("tokens", t, "refresh_margin", 6 * 3600.0, minimum=1),
        reconcile_interval=r.duration("tokens", t, "reconcile_interval", 3600.0, minimum=1),
    )


def _delivery(r: Reader, raw: Any) -> DeliveryConfig:
    d = r.section("delivery", raw, _fields(DeliveryConfig))
    return DeliveryConfig(
        send_deadline=r.duration(
            "delivery",
            d,
            "send_deadline",
            3600.0,
            minimum=1,
            maximum=MAX_SEND_DEADLINE,
            why=" (Cast remembers idempotency keys for 24h)",
        ),
        report_deadline=r.duration("delivery", d, "report_deadline", 3600.0, minimum=1),
        status_polls=_status_polls(r, d),
        allowed_regions=_regions(r, d),
        concurrency=r.integer("delivery", d, "concurrency", 32, 1, 1024),
        seen_retention=r.duration(
            "delivery", d, "seen_retention", DeliveryConfig.seen_retention, minimum=86400
        ),
        inbound_max_age=r.duration("delivery", d, "inbound_max_age", 7 * 86400.0, minimum=1),
        request_timeout=r.duration(
            "delivery",
            d,
            "request_timeout",
            10.0,
            minimum=0.5,
            maximum=10.0,
            why=" (a token refresh in flight at shutdown is awaited a little longer than this)",
        ),
    )


def _logging(r: Reader, raw: Any) -> LoggingConfig:
    lg = r.section("logging", raw, _fields(LoggingConfig))
    level = r.string("logging", lg, "level", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        r.problem("logging.level", f"must be debug, info, warning or error, got {level!r}")
    fmt = r.string("logging", lg, "format", "text").lower()
    if fmt not in ("text", "json"):
        r.problem("logging.format", f"must be text or json, got {fmt!r}")
    return LoggingConfig(level=level, format=fmt)


def _cast_locations(r: Reader, raw: Any) -> dict[str, CastLocationConfig]:
    locations = r.section("cast.locations", raw, set())
    # section() reported every key as unknown against an empty set; location ids are free-form.
    r.problems = [p for p in r.problems if not p.startswith(f"{r.path}: cast.locations.")]
    result = {}
    allowed = _with_file_variants(_fields(CastLocationConfig), {"api_key"})
    routes: dict[str, str] = {}
    for location_id, value in locations.items():
        key = f"cast.locations.{location_id}"
        entry = r.section(key, value, allowed)
        result[str(location_id)] = CastLocationConfig(
            api_key=r.secret(key, entry, "api_key", required=False),
            account=_account_name(r, key, entry),
            sender_id=_sender_id(r, key, entry) if "sender_id" in entry else None,
            inbound_numbers=r.string_list(key, entry, "inbound_numbers"),
        )
        for number in result[str(location_id)].inbound_numbers:
            other = routes.setdefault(route_key(number), str(location_id))
            if other != str(location_id):
                r.problem(
                    f"{key}.inbound_numbers",
                    f"{number!r} is also an inbound number of location {other}: "
                    "a reply to it must go to one location",
                )
    return result


def _account_name(r: Reader, key: str, raw: dict) -> str:
    """A Cast account's name: what logs, metrics and the outbox call it across key rotations.
    Given only with the key it names; never shaped like the default name (``acct-`` + hash)."""
    value = r.string(key, raw, "account")
    if not value:
        return ""
    if not ACCOUNT_NAME.fullmatch(value) or DEFAULT_ACCOUNT_NAME.fullmatch(value):
        r.problem(
            f"{key}.account",
            f"{value!r} must be 1-40 letters, digits, '.', '_' or '-' (not acct- and 10 hex "
            "digits, the name an unnamed account gets)",
        )
    elif "api_key" not in raw and "api_key_file" not in raw:
        r.problem(f"{key}.account", "names the Cast account of this entry's api_key: set api_key")
    return value


def _check_accounts(r: Reader, cast: CastConfig) -> None:
    """One name per Cast key and one key per name: two names for one account would pace it
    twice over, and one name for two keys would mix their idempotency scopes."""
    entries = [("cast", cast.api_key, cast.account)]
    entries += [
        (f"cast.locations.{loc}", o.api_key, o.account)
        for loc, o in cast.locations.items()
        if o.api_key is not None
    ]
    names: dict[str, tuple[str, str]] = {}
    keys: dict[str, tuple[str, str]] = {}
    for where, secret, name in entries:
        if not secret.value:
            continue
        name = name or default_account_name(secret.value)
        other = names.setdefault(name, (where, secret.value))
        if other[1] != secret.value:
            r.problem(f"{where}.account", f"{name!r} is also the account of {other[0]}'s other key")
        other = keys.setdefault(secret.value, (where, name))
        if other[1] != name:
            r.problem(f"{where}.account", f"the same api_key as {other[0]} under another name")


def _sender_id(r: Reader, key: str, raw: dict) -> str:
    """An alphanumeric sender ID longer than `MAX_SENDER_ID` is cut by carriers: an error.
    A numeric sender (a phone number, ``+`` and up to 15 digits) is not alphanumeric."""
    value = r.string(key, raw, "sender_id")
    if len(value) > MAX_SENDER_ID and not re.fullmatch(r"\+?\d{1,15}", value):
        r.problem(
            f"{key}.sender_id",
            f"{value!r} is {len(value)} characters; carriers cut sender IDs at "
            f"{MAX_SENDER_ID} (GSM alphanumeric limit), use at most {MAX_SENDER_ID}",
        )
    return value


def _status_polls(r: Reader, raw: dict) -> tuple[float, ...]:
    if "status_polls" not in raw:
        return DeliveryConfig.status_polls
    value = raw["status_polls"]
    try:
        if not isinstance(value, list) or not value:
            raise ValueError
        polls = tuple(parse_duration(r.interpolate("delivery.status_polls", v)) for v in value)
    except ValueError:
        r.problem("delivery.status_polls", "must be a non-empty list of durations like [5s, 1m]")
        return DeliveryConfig.status_polls
    if list(polls) != sorted(polls):
        r.problem("delivery.status_polls", "must be in increasing order (delays after the send)")
    return polls


def _regions(r: Reader, raw: dict) -> tuple[str, ...]:
    if "allowed_regions" not in raw:
        return DeliveryConfig.allowed_regions
    regions = r.string_list("delivery", raw, "allowed_regions")
    bad = [x for x in regions if x != "*" and not re.fullmatch(r"[A-Z]{2}", x)]
    unknown = [x for x in regions if x not in bad and x != "*" and x not in SUPPORTED_REGIONS]
    if bad:
        r.problem(
            "delivery.allowed_regions",
            f"must be ISO 3166 region codes like PH, or * for any; got {', '.join(bad)}",
        )
    elif unknown:
        r.problem(
            "delivery.allowed_regions",
            f"unknown region code(s) {', '.join(unknown)} (no numbering plan; e.g. PH, US, SG)",
        )
    return regions

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
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml
from phonenumbers import SUPPORTED_REGIONS

from castghld.phone import route_key

# A send may be retried until this long after GHL handed us the message; a later attempt could
# fall outside Cast's 24 h idempotency window and send twice (see outbound.py).
MAX_SEND_DEADLINE = 12 * 3600.0
# GSM alphanumeric sender IDs: Cast's API takes 20 characters, but carriers cut them at 11.
MAX_SENDER_ID = 11
DEFAULT_CONFIG_PATH = "/etc/castghld/castghld.yaml"
CONFIG_ENV = "CASTGHLD_CONFIG"

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(Exception):
    """One or more problems in the config; each is a complete, printable line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Secret:
    """A secret string; `repr`/`str` never reveal it, `.value` does (only where it is sent)."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    xheaders: bool = True
    shutdown_timeout: float = 20.0


@dataclass(frozen=True)
class GHLConfig:
    client_id: str = ""
    client_secret: Secret = Secret("")
    api_base: str = "https://services.leadconnectorhq.com"
    auth_base: str = "https://marketplace.gohighlevel.com"
    webhook_public_keys: tuple[str, ...] = ()
    conversation_provider_id: str = ""
    app_id: str = ""  # "" in the file: the part of client_id before the first "-" (resolved here)
    accept_legacy_rsa: bool = True


@dataclass(frozen=True)
class CastLocationConfig:
    api_key: Secret | None = None
    sender_id: str | None = None
    inbound_numbers: tuple[str, ...] = ()


@dataclass(frozen=True)
class CastConfig:
    api_base: str = "https://api.cast.ph"
    api_key: Secret = Secret("")
    sender_id: str = ""
    messages_per_second: int = 10
    requests_per_second: int = 30
    inbound_secret: Secret = Secret("")
    locations: Mapping[str, CastLocationConfig] = field(default_factory=dict)


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

    @property
    def redirect_uri(self) -> str:
        return self.server.public_url.rstrip("/") + "/oauth/callback"


def default_config_path() -> str:
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: with plain YAML the last one
    silently wins, and a second `cast:` section would replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``2.5``, ``30s``, ``5m``, ``1h`` or ``7d``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError("not a duration")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError("negative or infinite duration")
    return seconds


def check_private_file(path: str) -> None:
    """Raise ValueError unless `path` is a regular file no one but its owner may access."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(
            f"{path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )


# A secret is one line; a larger file is a wrong path (a 1 GB one was read whole, at every reload).
MAX_SECRET_FILE = 64 * 1024


def read_secret_file(path: str) -> str:
    """The stripped content of a private secret file; ValueError naming the fix otherwise. Never
    reads more than `MAX_SECRET_FILE` bytes."""
    try:
        check_private_file(path)
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SECRET_FILE + 1)
        if len(text) > MAX_SECRET_FILE:
            raise ValueError(
                f"secret file {path} is over {MAX_SECRET_FILE} bytes: not a secret (one line)"
            )
        return text.strip()
    except FileNotFoundError:
        raise ValueError(f"secret file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read secret file {path}: {e}") from None


class _Reader:
    """Walks the parsed YAML, collecting problems instead of stopping at the first."""

    def __init__(self, path: str):
        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    def interpolate(self, key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                self.problem(key, f"environment variable {name} is not set")
                return ""
            return os.environ[name]

        return _ENV_RE.sub(sub, value)

    def section(self, key: str, value: Any, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, got {type(value).__name__}")
            return {}
        for name in value:
            if name not in allowed:
                hint = f" (did you mean {_closest(str(name), allowed)}?)" if allowed else ""
                self.problem(f"{key}.{name}" if key else str(name), "unknown key" + hint)
        return value

    def typed(self, key: str, raw: dict[str, Any], name: str, default: Any, conv: Callable) -> Any:
        if name not in raw:
            return default
        full = f"{key}.{name}"
        value = self.interpolate(full, raw[name])
        try:
            return conv(value)
        except (TypeError, ValueError) as e:
            self.problem(full, str(e))
            return default

    def string(self, key: str, raw: dict, name: str, default: str = "") -> str:
        def conv(v: Any) -> str:
            if v is None:
                return ""
            if isinstance(v, (dict, list, bool)):
                raise ValueError(f"must be a string, got {type(v).__name__}")
            return str(v)

        return self.typed(key, raw, name, default, conv)

    def integer(self, key: str, raw: dict, name: str, default: int, lo: int, hi: int) -> int:
        def conv(v: Any) -> int:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ValueError(f"must be an integer from {lo} to {hi}")
            try:
                n = int(v)
            except ValueError:
                raise ValueError(f"must be an integer from {lo} to {hi}, got {v!r}") from None
            if not lo <= n <= hi:
                raise ValueError(f"must be an integer from {lo} to {hi}, got {n}")
            return n

        return self.typed(key, raw, name, default, conv)

    def boolean(self, key: str, raw: dict, name: str, default: bool) -> bool:
        def conv(v: Any) -> bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, str) and v.lower() in (
                "true",
                "yes",
                "on",
                "1",
                "false",
                "no",
                "off",
                "0",
            ):
                return v.lower() in ("true", "yes", "on", "1")
            raise ValueError(f"must be true or false, got {v!r}")

        return self.typed(key, raw, name, default, conv)

    def duration(
        self,
        key: str,
        raw: dict,
        name: str,
        default: float,
        minimum: float = 0,
        maximum: float | None = None,
        why: str = "",
    ) -> float:
        def conv(v: Any) -> float:
            try:
                seconds = parse_duration(v)
            except ValueError:
                raise ValueError(f"must be a duration like 30s, 5m, 1h or 7d, got {v!r}") from None
            if seconds < minimum:
                raise ValueError(f"must be at least {minimum:g}s, got {v!r}")
            if maximum is not None and seconds > maximum:
                raise ValueError(f"must be at most {maximum:g}s{why}, got {v!r}")
            return seconds

        return self.typed(key, raw, name, default, conv)

    def url(self, key: str, raw: dict, name: str, default: str, required: bool = False) -> str:
        value = self.string(key, raw, name, default)
        if not value:
            if required:
                self.problem(f"{key}.{name}", "is required (e.g. https://ghl.example.ph)")
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.problem(f"{key}.{name}", f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def path_value(self, key: str, raw: dict, name: str, default: str) -> str:
        value = self.string(key, raw, name, default)
        return os.path.join(self.base_dir, value) if value else value

    def string_list(self, key: str, raw: dict, name: str) -> tuple[str, ...]:
        if name not in raw or raw[name] is None:
            return ()
        full = f"{key}.{name}"
        value = raw[name]
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            self.problem(full, "must be a list of strings")
            return ()
        return tuple(str(self.interpolate(full, v)) for v in value)

    def secret(self, key: str, raw: dict, name: str, required: bool) -> Secret | None:
        """`name` inline or `name_file`; exactly one of them when required."""
        inline = self.string(key, raw, name, "")
        file_key = f"{name}_file"
        file_path = self.path_value(key, raw, file_key, "")
        if inline and file_path:
            self.problem(f"{key}.{name}", f"give either {name} or {file_key}, not both")
            return None
        if file_path:
            try:
                value = read_secret_file(file_path)
            except ValueError as e:
                self.problem(f"{key}.{file_key}", str(e))
                return None
            if not value:
                self.problem(f"{key}.{file_key}", f"secret file {file_path} is empty")
            return Secret(value)
        if inline:
            return Secret(inline)
        if required:
            self.problem(f"{key}.{name}", f"is required (set {name} or {file_key})")
        return None


def _closest(name: str, allowed: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.0)
    return match[0] if match else sorted(allowed)[0]


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _with_file_variants(names: set[str], secrets: set[str]) -> set[str]:
    return names | {f"{s}_file" for s in secrets}


def load_config(path: str) -> Config:
    """Read, interpolate and validate the config at `path`; ConfigError lists every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file does not exist (use --config PATH)"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read config file: {e}"]) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        what = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{path}: invalid YAML{line}: {what}"]) from None
    return build_config(path, raw if raw is not None else {})


def build_config(path: str, raw: Any) -> Config:
    r = _Reader(path)
    sections = {"server", "ghl", "cast", "state", "tokens", "delivery", "logging"}
    top = r.section("", raw, sections)

    s = r.section("server", top.get("server"), _fields(ServerConfig))
    server = ServerConfig(
        host=r.string("server", s, "host", ServerConfig.host),
        port=r.integer("server", s, "port", ServerConfig.port, 0, 65535),
        public_url=r.url("server", s, "public_url", "", required=True),
        xheaders=r.boolean("server", s, "xheaders", ServerConfig.xheaders),
        shutdown_timeout=r.duration("server", s, "shutdown_timeout", 20.0, minimum=1),
    )
    if not server.host.strip():
        r.problem("server.host", "must not be empty (write 0.0.0.0 to listen on every interface)")

    g = r.section("ghl", top.get("ghl"), _with_file_variants(_fields(GHLConfig), {"client_secret"}))
    client_id = r.string("ghl", g, "client_id")
    if not client_id:
        r.problem("ghl.client_id", "is required (from the GHL marketplace app settings)")
    ghl = GHLConfig(
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

    c = r.section(
        "cast",
        top.get("cast"),
        _with_file_variants(_fields(CastConfig), {"api_key", "inbound_secret"}),
    )
    cast = CastConfig(
        api_base=r.url("cast", c, "api_base", CastConfig.api_base),
        api_key=r.secret("cast", c, "api_key", required=True) or Secret(""),
        sender_id=_sender_id(r, "cast", c),
        messages_per_second=r.integer("cast", c, "messages_per_second", 10, 1, 10000),
        requests_per_second=r.integer("cast", c, "requests_per_second", 30, 1, 10000),
        inbound_secret=r.secret("cast", c, "inbound_secret", required=True) or Secret(""),
        locations=_cast_locations(r, c.get("locations")),
    )

    st = r.section("state", top.get("state"), _fields(StateConfig))
    state = StateConfig(
        dir=r.path_value("state", st, "dir", StateConfig.dir),
        key_file=r.path_value("state", st, "key_file", StateConfig.key_file),
    )

    t = r.section("tokens", top.get("tokens"), _fields(TokensConfig))
    tokens = TokensConfig(
        refresh_interval=r.duration("tokens", t, "refresh_interval", 300.0, minimum=1),
        refresh_margin=r.duration("tokens", t, "refresh_margin", 6 * 3600.0, minimum=1),
        reconcile_interval=r.duration("tokens", t, "reconcile_interval", 3600.0, minimum=1),
    )

    d = r.section("delivery", top.get("delivery"), _fields(DeliveryConfig))
    delivery = DeliveryConfig(
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

    lg = r.section("logging", top.get("logging"), _fields(LoggingConfig))
    level = r.string("logging", lg, "level", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        r.problem("logging.level", f"must be debug, info, warning or error, got {level!r}")
    fmt = r.string("logging", lg, "format", "text").lower()
    if fmt not in ("text", "json"):
        r.problem("logging.format", f"must be text or json, got {fmt!r}")
    logging_cfg = LoggingConfig(level=level, format=fmt)

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
    )


def _cast_locations(r: _Reader, raw: Any) -> dict[str, CastLocationConfig]:
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


def _sender_id(r: _Reader, key: str, raw: dict) -> str:
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


def _status_polls(r: _Reader, raw: dict) -> tuple[float, ...]:
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


def _regions(r: _Reader, raw: dict) -> tuple[str, ...]:
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

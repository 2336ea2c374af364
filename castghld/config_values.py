"""The values of a config file: how each kind is read and checked.

`Reader` walks the parsed YAML of one file, converting each value to its type (string, integer,
boolean, duration, URL, path, list, secret) and collecting problems instead of stopping at the
first; `config.build_config` uses it section by section. Also here: `Secret`, `parse_duration`,
the secret-file checks and the YAML loader that refuses duplicate keys.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Secret:
    """A secret string; `repr`/`str` never reveal it, `.value` does (only where it is sent).
    `source`: the `*_file` it was read from ("" when inline); not part of equality."""

    value: str = field(repr=False)
    source: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self.value)


class StrictLoader(yaml.SafeLoader):
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


def _in_unit_of(seconds: float, given: Any) -> str:
    """`seconds` in the unit the user wrote `given` in (43200 for `13h` -> "12h"), so a limit
    reads in the same terms as the value it refuses; in seconds for a bare number."""
    match = _DURATION_RE.match(given) if isinstance(given, str) else None
    unit = match.group(2) if match else ""
    if unit in ("", "s"):
        return f"{seconds:g}s"
    return f"{seconds / _DURATION_UNITS[unit]:g}{unit}"


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


# A secret is one line: a larger file is a wrong path, refused before it is read so that a huge
# file cannot stall the start or a reload.
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


# systemd sets $CREDENTIALS_DIRECTORY for the unit's processes only (LoadCredential=).
CREDENTIALS_HINT = (
    " (systemd sets it for the castghld unit's processes only; elsewhere give the secret "
    "file's own path)"
)


class Reader:
    """Walks the parsed YAML, collecting problems instead of stopping at the first."""

    def __init__(self, path: str, secrets: bool = True):
        """`secrets=False`: the operator commands' reading (see `load_config`): secrets are
        neither required nor read, and an unset ``${VAR}`` is kept in `unresolved` (key path ->
        problem line) for the command to require if it uses that key."""
        self.path = path
        self.base_dir = os.path.dirname(os.path.abspath(path))
        self.problems: list[str] = []
        self.secrets = secrets
        self.unresolved: dict[str, str] = {}

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    def interpolate(self, key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                hint = CREDENTIALS_HINT if name == "CREDENTIALS_DIRECTORY" else ""
                message = f"environment variable {name} is not set{hint}"
                if self.secrets:
                    self.problem(key, message)
                else:
                    self.unresolved[key] = f"{self.path}: {key}: {message}"
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
        known = len(self.problems)
        value = self.interpolate(full, raw[name])
        if len(self.problems) > known or full in self.unresolved:
            # An unset variable is the problem; the value without it would only add a second,
            # misleading one (`${CREDENTIALS_DIRECTORY}/key` read as the file `/key`).
            return default
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
                raise ValueError(f"must be at least {_in_unit_of(minimum, v)}, got {v!r}")
            if maximum is not None and seconds > maximum:
                raise ValueError(f"must be at most {_in_unit_of(maximum, v)}{why}, got {v!r}")
            return seconds

        return self.typed(key, raw, name, default, conv)

    def url(self, key: str, raw: dict, name: str, default: str, required: bool = False) -> str:
        value = self.string(key, raw, name, default)
        if not value:
            if required and f"{key}.{name}" not in self.unresolved:
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
        """`name` inline or `name_file`; exactly one of them when required. Not read at all
        when the reader skips secrets."""
        if not self.secrets:
            return None
        known = len(self.problems)
        inline = self.string(key, raw, name, "")
        file_key = f"{name}_file"
        file_path = self.path_value(key, raw, file_key, "")
        if len(self.problems) > known:  # already said what is wrong with it
            return None
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
            return Secret(value, file_path)
        if inline:
            return Secret(inline)
        if required:
            self.problem(f"{key}.{name}", f"is required (set {name} or {file_key})")
        return None


def _closest(name: str, allowed: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.0)
    return match[0] if match else sorted(allowed)[0]

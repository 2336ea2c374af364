"""What a SIGHUP reload changes: the difference between two configs, and which of it waits.

Guarantees:
- `config_changes` names every key whose value differs, by its path in the YAML file
  (`cast.api_key`, `cast.locations.LOC.sender_id`); a secret is named, never shown.
- `unrefreshed_credentials` names the secrets read from `$CREDENTIALS_DIRECTORY` whose value a
  reload found unchanged: systemd copies `LoadCredential=` files at start and (before its newest
  releases) never again, so an unchanged copy says nothing about its source; the reload log says
  so instead of claiming the secret was re-read.
- `effective_config` is the new config with every `RESTART_KEYS` value put back to the running
  one: what the components see after a reload is always what the process really does (the
  listening address stays the one it listens on), and those keys are reported as waiting for a
  restart instead of being silently ignored.
- Every other key is applied by the reload: the components read it from the config at each use
  (`Daemon.config_holders` hands them the new one), periodic loops re-measure their wait
  (`castghld.periodic`), upstream requests take `delivery.request_timeout` per request.
  tests/test_reload_keys.py walks the config dataclasses and fails for a key that is in neither
  this list nor its list of reload tests.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

from castghld.config import Config, Secret

# Keys a running process cannot change: sockets, files it holds open or locked, and values built
# into long-lived objects (pacing windows, worker pools, upstream base URLs of open connections).
RESTART_KEYS = (
    "server.host",
    "server.port",
    "server.xheaders",
    "server.admin_socket",
    "state.dir",
    "state.key_file",
    "ghl.api_base",
    "cast.api_base",
    "cast.messages_per_second",
    "cast.requests_per_second",
    "delivery.concurrency",
    "delivery.seen_retention",
)


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    secret: bool = False

    def describe(self) -> str:
        if self.secret:
            return f"{self.key} (secret) changed"
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if value is None:
        return "-"
    return repr(value) if isinstance(value, str) else str(value)


def _diff(prefix: str, old: Any, new: Any, out: list[Change]) -> None:
    if isinstance(old, Secret) or isinstance(new, Secret):
        if getattr(old, "value", None) != getattr(new, "value", None):
            out.append(Change(prefix, None, None, secret=True))
        return
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        for f in dataclasses.fields(old):
            if f.name == "path":
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            _diff(key, getattr(old, f.name), getattr(new, f.name), out)
        return
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for name in sorted(set(old) | set(new)):
            key = f"{prefix}.{name}"
            if name not in new:
                out.append(Change(key, "configured", "removed"))
            elif name not in old:
                out.append(Change(key, "absent", "added"))
            else:
                _diff(key, old[name], new[name], out)
        return
    if old != new:
        out.append(Change(prefix, old, new))


def config_changes(old: Config, new: Config) -> list[Change]:
    """Every key whose value differs between `old` and `new`, in file order."""
    out: list[Change] = []
    _diff("", old, new, out)
    return out


def _secrets(prefix: str, value: Any) -> Iterator[tuple[str, Secret]]:
    """(key path, Secret) of every secret in a config, in file order."""
    if isinstance(value, Secret):
        yield prefix, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            key = f"{prefix}.{f.name}" if prefix else f.name
            yield from _secrets(key, getattr(value, f.name))
    elif isinstance(value, Mapping):
        for name in value:
            yield from _secrets(f"{prefix}.{name}", value[name])


def unrefreshed_credentials(old: Config, new: Config) -> list[str]:
    """The `*_file` keys (`cast.api_key_file`) of `new` read from `$CREDENTIALS_DIRECTORY` with
    the value the running config has: whether their source changed cannot be known here."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        return []
    directory = os.path.join(os.path.realpath(directory), "")
    before = dict(_secrets("", old))
    out = []
    for key, secret in _secrets("", new):
        source = os.path.realpath(secret.source) if secret.source else ""
        previous = before.get(key)
        if source.startswith(directory) and previous is not None and previous == secret:
            out.append(key + "_file")
    return out


def needs_restart(change: Change) -> bool:
    return change.key in RESTART_KEYS


def effective_config(running: Config, new: Config) -> Config:
    """`new` with each of RESTART_KEYS kept at its `running` value."""
    sections: dict[str, dict[str, Any]] = {}
    for key in RESTART_KEYS:
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = getattr(getattr(running, section), name)
    replaced = {
        section: dataclasses.replace(getattr(new, section), **values)
        for section, values in sections.items()
    }
    return dataclasses.replace(new, **replaced)

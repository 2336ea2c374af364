"""The daemon's durable records: an encrypted state file, small commits, occasional compaction.

Guarantees:
- The state is AES-256-GCM encrypted with the newest key of `state.key_file`; every key in the
  file can decrypt (rotation: add a new first line, the next write re-encrypts with it; see
  `castghld.keyring`).
- Commits are small: a commit appends one frame (the records it changed) to the state journal and
  fsyncs it; the whole state is rewritten only by an occasional compaction, from each record's
  cached JSON line (never re-serialised), in bounded frames on a thread of its own. Every file is
  written 0600 from birth; a file that replaces another is created next to it (`mkstemp`), fsynced,
  renamed with `os.replace` and the directory fsynced (`castghld.files`). A crash at any point
  leaves a loadable state holding every commit that returned (`StateStore` says how).
- One writer at a time. Writes are coalesced: callers that commit while a write is running are
  served by the next write, which carries all their changes. Encryption and fsync run on worker
  threads; the IOLoop only serialises the records that changed.
- A wrong key, a truncated or tampered file or a missing key file raise `StateError` naming the
  file, at load time; the store then refuses to write, so such a file is never overwritten.

Records are JSON values grouped in named sections (``installs``, ...). They are treated as
immutable: change a record by `put`-ting a new value, never by mutating one in place, so a
record's cached JSON line always matches its value.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from castghld.files import (
    LOCK_FILENAME,
    TEMP_PREFIX,
    TRANSIENT_ERRNOS,
    StateError,
    atomic_write,
    create_private_file,
    fsync_dir,
    is_transient,
    lock_directory,
    remove_leftover_temp_files,
)
from castghld.keyring import KeyRing, new_key_line
from castghld.statefiles import STATE_FILENAME, StateFiles, record_line

# Re-exported from castghld.files and castghld.keyring for the modules that import them from here.
__all__ = [
    "LOCK_FILENAME",
    "STATE_FILENAME",
    "TEMP_PREFIX",
    "TRANSIENT_ERRNOS",
    "KeyRing",
    "StateError",
    "StateStore",
    "atomic_write",
    "create_private_file",
    "fsync_dir",
    "is_transient",
    "lock_directory",
    "new_key_line",
    "remove_leftover_temp_files",
]

log = logging.getLogger("castghld.state")
# Key rotation's lines: the text log's scrubber takes "castghld.state: WORD" for a secret named
# "state" and hides WORD, so these go under a logger name it leaves alone.
rotation_log = logging.getLogger("castghld.keys")

# The ids of the keys starts have found in the key file, newest first (`key_history`).
KEY_HISTORY = ("keyring", "key_ids")
MAX_KEY_HISTORY = 64
COMPACT_MIN_BYTES = 1 << 20  # compact once the journals exceed this and the snapshot's size
COMPACT_RETRY_SECONDS = 60.0


class StateStore:
    """The daemon's durable records: load once at startup, then `put`/`delete` + `await commit()`.

    Nothing is durable until `commit()` returns: a caller that must not lose a change (a new token
    pair) awaits it before acting on the change.

    A commit appends the records it changed to the current journal; once the journals outgrow the
    snapshot, a compaction writes a new snapshot in the background while commits go on (the files,
    their format and what a crash at each step leaves: `castghld.statefiles`).
    """

    def __init__(self, directory: str, keyring: KeyRing):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILENAME)
        self.keyring = keyring
        self.on_write: Callable[[float], None] | None = None  # seconds of each durable write
        self._files = StateFiles(directory, keyring)
        self._sections: dict[str, dict[str, Any]] = {}
        self._lines: dict[tuple[str, str], str] = {}  # each record's JSON line, as on disk
        self._changed: dict[tuple[str, str], None] = {}  # records changed since the last write
        self._loaded = False
        self._rewrite = False  # the snapshot must be rewritten (none yet, older key or format)
        self._version = 0  # bumped by every change
        self._durable_version = 0
        self._write_task: asyncio.Task | None = None
        self._compaction: asyncio.Task | None = None
        self._compaction_failed_at = -math.inf
        self.compact_min_bytes = COMPACT_MIN_BYTES
        self.last_write_seconds = 0.0
        self.write_count = 0
        self.compactions = 0

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Read and decrypt the snapshot and replay its journals (nothing on disk: empty state).

        Reading never writes: `check-config` and `installs` use it on a live daemon's files."""
        self._sections, self._lines = {}, {}
        found, self._rewrite = self._files.load(self._apply)
        self._loaded = True
        if found and self._rewrite:
            self._version += 1  # make sure a write happens

    def _apply(self, line: str, item: list[Any]) -> None:
        section, key = item[0], item[1]
        if len(item) == 3:
            self._sections.setdefault(section, {})[key] = item[2]
            self._lines[(section, key)] = line
        else:
            self._sections.get(section, {}).pop(key, None)
            self._lines.pop((section, key), None)

    # -- records -------------------------------------------------------------------------------

    def get(self, section: str, key: str) -> Any:
        return self._sections.get(section, {}).get(key)

    def items(self, section: str) -> Iterator[tuple[str, Any]]:
        return iter(list(self._sections.get(section, {}).items()))

    def count(self, section: str) -> int:
        return len(self._sections.get(section, {}))

    def put(self, section: str, key: str, value: Any) -> None:
        self._sections.setdefault(section, {})[key] = value
        self._changed[(section, key)] = None
        self._version += 1

    def delete(self, section: str, key: str) -> bool:
        removed = self._sections.get(section, {}).pop(key, None) is not None
        if removed:
            self._changed[(section, key)] = None
            self._version += 1
        return removed

    @property
    def dirty(self) -> bool:
        return self._version != self._durable_version

    # -- key rotation --------------------------------------------------------------------------

    def key_history(self) -> list[str]:
        """Ids (hex, never keys) of the keys that starts found in the key file, newest first: an
        outbox line under one the ring lacks needs that key back (`Journal.retired_key_ids`)."""
        value = self.get(*KEY_HISTORY)
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    async def adopt_newest_key(self) -> bool:
        """At start, before anything else writes: record the ring's key ids in the history and
        rewrite the state under the newest key if any of it is under an older one (a snapshot,
        `StateFiles.write_snapshot`: a crash leaves the old files, readable with the key file in
        place). False, logged, if it could not be written: the older key is still needed."""
        history = list(dict.fromkeys([*self.keyring.key_ids, *self.key_history()]))
        if history[:MAX_KEY_HISTORY] != self.key_history():
            self.put(*KEY_HISTORY, history[:MAX_KEY_HISTORY])
        stale = self._files.stale_key
        try:
            await self.commit()
        except OSError as e:
            rotation_log.error(
                "cannot write the state file %s at start (%s)%s",
                self.path,
                e.strerror or e,
                "; it still needs the older key(s) of the key file" if stale else "",
            )
            return False
        if stale:
            self._files.stale_key = False
            rotation_log.info(
                "re-encrypted the state file %s with the newest key %s", self.path, history[0]
            )
        return True

    # -- writing -------------------------------------------------------------------------------

    async def commit(self) -> None:
        """Return once every change made before this call is on disk (or raise OSError)."""
        if not self._loaded:
            raise StateError(f"{self.path}: state was not loaded; refusing to overwrite it")
        target = self._version
        while self._durable_version < target:
            if self._write_task is None or self._write_task.done():
                self._write_task = asyncio.ensure_future(self._write())
            await asyncio.shield(self._write_task)

    async def _write(self) -> None:
        """Write what changed since the last write: one journal frame, or a whole snapshot when
        one is due (none yet, an older key or format). Serialises only the changed records."""
        version = self._version
        changed, self._changed = self._changed, {}
        lines = []
        for section, key in changed:
            value = self._sections.get(section, {}).get(key)
            if value is None:
                self._lines.pop((section, key), None)
                lines.append(json.dumps([section, key], separators=(",", ":")))
            else:
                line = record_line(section, key, value)
                self._lines[(section, key)] = line
                lines.append(line)
        started = time.monotonic()
        try:
            if self._rewrite:
                await self._compact(*self._cut())
            elif lines:
                await self._files.append("\n".join(lines).encode("utf-8"))
        except BaseException:
            for record in changed:  # the next write carries them again
                self._changed.setdefault(record)
            raise
        self.last_write_seconds = time.monotonic() - started
        if self.on_write is not None:
            self.on_write(self.last_write_seconds)
        self.write_count += 1
        self._durable_version = max(self._durable_version, version)
        if self._compaction_due():
            # The cut happens here, while no append runs; the snapshot is written meanwhile.
            self._compaction = asyncio.ensure_future(self._compact_in_background(*self._cut()))

    def _compaction_due(self) -> bool:
        if self._compaction is not None and not self._compaction.done():
            return False
        if time.monotonic() - self._compaction_failed_at < COMPACT_RETRY_SECONDS:
            return False
        return self._files.outgrown(self.compact_min_bytes)

    def _cut(self) -> tuple[int, list[str]]:
        """Start journal g+1 for the commits that follow; every record's line, for snapshot g+1."""
        return self._files.cut(), list(self._lines.values())

    async def _compact_in_background(self, generation: int, lines: list[str]) -> None:
        try:
            await self._compact(generation, lines)
        except OSError as e:
            self._compaction_failed_at = time.monotonic()
            log.error("state: compaction of %s failed (journals kept): %s", self.path, e)

    async def _compact(self, generation: int, lines: list[str]) -> None:
        """Write snapshot `generation` of `lines` (see `StateFiles.write_snapshot`)."""
        await self._files.write_snapshot(generation, lines)
        self._rewrite = False
        self.compactions += 1

    def close(self) -> None:
        self._files.close()

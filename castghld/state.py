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
import concurrent.futures
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
from castghld.keyring import BLOB_MAGIC, KeyRing, new_key_line

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

STATE_FILENAME = "state.bin"
_SNAPSHOT_MAGIC = b"CGS2"
_JOURNAL_MAGIC = b"CGJ1"
_FILE_HEADER_LEN = len(_SNAPSHOT_MAGIC) + 8  # magic + generation
SNAPSHOT_CHUNK = 500  # records per snapshot frame: bounds each encryption's hold on the GIL
COMPACT_MIN_BYTES = 1 << 20  # compact once the journals exceed this and the snapshot's size
COMPACT_RETRY_SECONDS = 60.0


class StateStore:
    """The daemon's durable records: load once at startup, then `put`/`delete` + `await commit()`.

    Nothing is durable until `commit()` returns: a caller that must not lose a change (a new token
    pair) awaits it before acting on the change.

    On disk (all 0600 from birth, every frame AES-256-GCM under the newest key):
    - ``state.bin``: a snapshot of generation g, one JSON line per record, written in frames of
      `SNAPSHOT_CHUNK` records and closed by an end frame (a cut-short file is refused);
    - ``state.journal.<g>``: what was committed after snapshot g's cut, one frame per commit (the
      JSON lines of the records it changed). A commit costs one small append + fsync, whatever the
      number of records; a torn last frame (a crash mid-append, never acknowledged) is dropped on
      load and cut away by the next append, any other damage is refused.
    - Compaction, once the journals outgrow the snapshot: on the IOLoop the writer switches to
      journal g+1 and takes the cached JSON lines of every record (no re-serialisation); a thread
      writes snapshot g+1 atomically in frames (never holding the GIL for more than one frame's
      encryption), then deletes the journals it makes redundant. Load replays every journal of
      generation >= the snapshot's in order, so a crash at any step loses nothing committed.
    """

    def __init__(self, directory: str, keyring: KeyRing):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILENAME)
        self.keyring = keyring
        self.on_write: Callable[[float], None] | None = None  # seconds of each durable write
        self._sections: dict[str, dict[str, Any]] = {}
        self._lines: dict[tuple[str, str], str] = {}  # each record's JSON line, as on disk
        self._changed: dict[tuple[str, str], None] = {}  # records changed since the last write
        self._loaded = False
        self._rewrite = False  # the snapshot must be rewritten (none yet, older key or format)
        self._version = 0  # bumped by every change
        self._durable_version = 0
        self._generation = 0  # of the snapshot on disk (0: none)
        self._snapshot_bytes = 0
        self._journal_gen = 0  # the journal that commits append to
        self._journal_fd: int | None = None
        self._journal_fd_gen = 0
        self._journal_seq = 0  # frames in the current journal (authenticated: no reordering)
        self._journal_valid_size: int | None = None  # where a torn last frame starts
        self._journal_bytes: dict[int, int] = {}  # bytes per journal generation not yet compacted
        self._write_task: asyncio.Task | None = None
        self._compaction: asyncio.Task | None = None
        self._compaction_failed_at = -math.inf
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "castghld-state")
        self._compactor = concurrent.futures.ThreadPoolExecutor(1, "castghld-state-compact")
        self.compact_min_bytes = COMPACT_MIN_BYTES
        self.last_write_seconds = 0.0
        self.write_count = 0
        self.compactions = 0

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Read and decrypt the snapshot and replay its journals (nothing on disk: empty state).

        Reading never writes: `check-config` and `installs` use it on a live daemon's files."""
        if not os.path.isdir(self.directory):
            raise StateError(
                f"{self.directory}: state directory does not exist (create it, mode 0700)"
            )
        # The snapshot first, then its journals. A live daemon (under check-config or installs)
        # may compact in between: a journal it deleted meanwhile is skipped, so such a read-only
        # view may lack the newest commits, but it never fails for that.
        try:
            with open(self.path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            journals = self._journal_files()
            if journals:
                raise StateError(
                    f"{self.path}: missing, but {journals[-1][1]} exists; restore the state file "
                    "from a backup (the journal alone is not the state)"
                ) from None
            self._sections, self._lines = {}, {}
            self._loaded = self._rewrite = True
            return
        except OSError as e:
            raise StateError(
                f"{self.path}: cannot read state file: {e}", transient=is_transient(e)
            ) from None
        self._sections, self._lines = {}, {}
        stale_key = False
        if blob.startswith(BLOB_MAGIC):  # format 1: one encrypted JSON document
            plaintext = self.keyring.decrypt(blob, self.path, context=b"state")
            self._load_format1(plaintext)
            self._rewrite = True
        else:
            self._generation, stale_key = self._load_snapshot(blob)
            self._snapshot_bytes = len(blob)
        self._journal_gen = self._generation
        for generation, path in self._journal_files():
            if generation < self._generation:
                continue  # its records are in the snapshot; the next compaction deletes it
            stale_key |= self._replay_journal(generation, path)
            self._journal_gen = generation
        self._loaded = True
        if stale_key:
            log.info("state file uses an older key; it will be re-encrypted with the newest")
            self._rewrite = True
        if self._rewrite:
            self._version += 1  # make sure a write happens

    def _journal_files(self) -> list[tuple[int, str]]:
        found = []
        prefix = STATE_FILENAME.replace(".bin", ".journal.")
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                found.append((int(name[len(prefix) :]), os.path.join(self.directory, name)))
        return sorted(found)

    def _journal_path(self, generation: int) -> str:
        return os.path.join(
            self.directory, STATE_FILENAME.replace(".bin", f".journal.{generation}")
        )

    def _load_format1(self, plaintext: bytes) -> None:
        try:
            sections = json.loads(plaintext)["sections"]
            for section, records in sections.items():
                for key, value in records.items():
                    self._apply(_record_line(section, key, value), [section, key, value])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StateError(
                f"{self.path}: decrypted, but the content is not castghld state"
            ) from None

    def _load_snapshot(self, blob: bytes) -> tuple[int, bool]:
        truncated = f"{self.path}: authentication failed: the file is truncated or was altered"
        if not blob.startswith(_SNAPSHOT_MAGIC) or len(blob) < _FILE_HEADER_LEN:
            raise StateError(f"{self.path}: not a castghld state file, or truncated")
        generation = int.from_bytes(blob[len(_SNAPSHOT_MAGIC) : _FILE_HEADER_LEN], "big")
        stale_key = False
        records = 0
        for seq, frame, _ in _frames(blob, _FILE_HEADER_LEN):
            if frame is None:
                raise StateError(truncated)
            stale_key |= not self.keyring.is_current(frame)
            plaintext = self.keyring.decrypt(frame, self.path, _context(b"state", generation, seq))
            if plaintext[:1] == b"E":
                if json.loads(plaintext[1:])["records"] != records:
                    raise StateError(truncated)
                return generation, stale_key
            records += self._apply_lines(plaintext[1:], self.path)
        raise StateError(truncated)

    def _replay_journal(self, generation: int, path: str) -> bool:
        """Apply journal `generation`'s frames; True if one is under an older key."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:  # compacted away by a live daemon since it was listed
            return False
        except OSError as e:
            raise StateError(
                f"{path}: cannot read state journal: {e}", transient=is_transient(e)
            ) from None
        header = _JOURNAL_MAGIC + generation.to_bytes(8, "big")
        if not data.startswith(header):
            raise StateError(f"{path}: not a castghld state journal of generation {generation}")
        stale_key = False
        valid = len(header)
        applied = 0
        for seq, frame, end in _frames(data, len(header)):
            try:
                if frame is None:
                    raise StateError(f"{path}: commit {seq + 1} is cut short")
                context = _context(b"journal", generation, seq)
                plaintext = self.keyring.decrypt(frame, f"{path}: commit {seq + 1}", context)
            except StateError:
                if end >= len(data):  # a crash cut this append short: it was never acknowledged
                    log.warning("state: dropping a torn last commit in %s", path)
                    break
                raise
            stale_key |= not self.keyring.is_current(frame)
            self._apply_lines(plaintext, path)
            valid = end
            applied += 1
        self._journal_seq = applied
        self._journal_valid_size = valid
        self._journal_bytes[generation] = valid
        return stale_key

    def _apply_lines(self, plaintext: bytes, what: str) -> int:
        count = 0
        for line in plaintext.decode("utf-8").split("\n"):
            try:
                item = json.loads(line)
                if not isinstance(item, list) or len(item) not in (2, 3):
                    raise ValueError
            except ValueError:
                raise StateError(
                    f"{what}: decrypted, but the content is not castghld state"
                ) from None
            self._apply(line, item)
            count += 1
        return count

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
                line = _record_line(section, key, value)
                self._lines[(section, key)] = line
                lines.append(line)
        started = time.monotonic()
        try:
            if self._rewrite:
                await self._compact(*self._cut())
            elif lines:
                data = "\n".join(lines).encode("utf-8")
                generation, seq = self._journal_gen, self._journal_seq
                loop = asyncio.get_running_loop()
                size = await loop.run_in_executor(
                    self._executor, self._append_sync, data, generation, seq
                )
                self._journal_seq = seq + 1
                self._journal_bytes[generation] = size
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

    def _append_sync(self, plaintext: bytes, generation: int, seq: int) -> int:
        """Append commit frame `seq` to journal `generation` and fsync it (worker thread); the
        journal's new size."""
        if self._journal_fd is not None and self._journal_fd_gen != generation:
            os.close(self._journal_fd)
            self._journal_fd = None
        if self._journal_fd is None:
            self._open_journal(generation)
        assert self._journal_fd is not None
        frame = self.keyring.encrypt(plaintext, _context(b"journal", generation, seq))
        data = len(frame).to_bytes(4, "big") + frame
        start = os.lseek(self._journal_fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._journal_fd, view) :]
            os.fsync(self._journal_fd)
        except OSError:
            try:  # the next frame must start on a clean boundary
                os.ftruncate(self._journal_fd, start)
            except OSError:
                log.exception(
                    "state: cannot cut %s back after a failed write", self._journal_path(generation)
                )
            raise
        return start + len(data)

    def _open_journal(self, generation: int) -> None:
        path = self._journal_path(generation)
        header = _JOURNAL_MAGIC + generation.to_bytes(8, "big")
        if not os.path.exists(path):
            atomic_write(path, header)  # never a journal without its header
            self._journal_valid_size = None
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        if self._journal_valid_size is not None and os.fstat(fd).st_size > self._journal_valid_size:
            os.ftruncate(fd, self._journal_valid_size)  # a torn last frame found by load()
            os.fsync(fd)
        self._journal_valid_size = None
        self._journal_fd, self._journal_fd_gen = fd, generation

    def _compaction_due(self) -> bool:
        if self._compaction is not None and not self._compaction.done():
            return False
        if time.monotonic() - self._compaction_failed_at < COMPACT_RETRY_SECONDS:
            return False
        journals = sum(self._journal_bytes.values())
        return journals > max(self.compact_min_bytes, self._snapshot_bytes)

    def _cut(self) -> tuple[int, list[str]]:
        """Start journal g+1 for the commits that follow; every record's line, for snapshot g+1."""
        self._journal_gen += 1
        self._journal_seq = 0
        return self._journal_gen, list(self._lines.values())

    async def _compact_in_background(self, generation: int, lines: list[str]) -> None:
        try:
            await self._compact(generation, lines)
        except OSError as e:
            self._compaction_failed_at = time.monotonic()
            log.error("state: compaction of %s failed (journals kept): %s", self.path, e)

    async def _compact(self, generation: int, lines: list[str]) -> None:
        """Write snapshot `generation` of `lines` on the compaction thread; journals older than
        the cut are deleted once it is in place."""
        loop = asyncio.get_running_loop()
        size = await loop.run_in_executor(
            self._compactor, self._write_snapshot_sync, generation, lines
        )
        self._generation = generation
        self._snapshot_bytes = size
        self._rewrite = False
        for old in [g for g in self._journal_bytes if g < generation]:
            del self._journal_bytes[old]
        self.compactions += 1

    def _write_snapshot_sync(self, generation: int, lines: list[str]) -> int:
        written = 0

        def write(f: Any) -> None:
            nonlocal written
            f.write(_SNAPSHOT_MAGIC + generation.to_bytes(8, "big"))
            seq = 0
            for start in range(0, len(lines), SNAPSHOT_CHUNK):
                chunk = b"R" + "\n".join(lines[start : start + SNAPSHOT_CHUNK]).encode("utf-8")
                frame = self.keyring.encrypt(chunk, _context(b"state", generation, seq))
                f.write(len(frame).to_bytes(4, "big") + frame)
                seq += 1
            end = b"E" + json.dumps({"records": len(lines)}).encode("ascii")
            frame = self.keyring.encrypt(end, _context(b"state", generation, seq))
            f.write(len(frame).to_bytes(4, "big") + frame)
            written = f.tell()

        atomic_write(self.path, write)
        for old, path in self._journal_files():
            if old < generation:  # everything it holds is in the new snapshot
                os.unlink(path)
        fsync_dir(self.directory)
        return written

    def close(self) -> None:
        self._compactor.shutdown(wait=True)
        self._executor.shutdown(wait=True)
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None


def _record_line(section: str, key: str, value: Any) -> str:
    return json.dumps([section, key, value], separators=(",", ":"))


def _context(kind: bytes, generation: int, seq: int) -> bytes:
    """Associated data of a frame: a frame moved to another file or position fails to decrypt."""
    return b"state-" + kind + generation.to_bytes(8, "big") + seq.to_bytes(8, "big")


def _frames(data: bytes, offset: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(index, frame, end offset) of each length-prefixed frame; frame None if cut short."""
    seq = 0
    while offset < len(data):
        if offset + 4 > len(data):
            yield seq, None, len(data)
            return
        length = int.from_bytes(data[offset : offset + 4], "big")
        end = offset + 4 + length
        if end > len(data):
            yield seq, None, len(data)
            return
        yield seq, data[offset + 4 : end], end
        offset = end
        seq += 1

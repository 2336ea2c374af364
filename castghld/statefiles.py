"""The state store's files: a snapshot, ``state.bin``, and the journals of commits since it.

Guarantees (all files 0600 from birth, every frame AES-256-GCM under the newest key):
- ``state.bin``: a snapshot of generation g, one JSON line per record, written in frames of
  `SNAPSHOT_CHUNK` records and closed by an end frame (a cut-short file is refused);
- ``state.journal.<g>``: what was committed after snapshot g's cut, one frame per commit (the
  JSON lines of the records it changed). A commit costs one small append + fsync, whatever the
  number of records; a torn last frame (a crash mid-append, never acknowledged) is dropped on
  load and cut away by the next append, any other damage is refused.
- Compaction, once the journals outgrow the snapshot: on the IOLoop the writer switches to
  journal g+1 (`StateFiles.cut`) and takes the cached JSON lines of every record (no
  re-serialisation); a thread writes snapshot g+1 atomically in frames (never holding the GIL for
  more than one frame's encryption), then deletes the journals it makes redundant. Load replays
  every journal of generation >= the snapshot's in order, so a crash at any step loses nothing
  committed.
- Each frame is authenticated with its file kind, generation and position: a frame moved to
  another file or place fails to decrypt.

The records themselves, and when to write, are `castghld.state.StateStore`'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from castghld.files import StateError, atomic_write, fsync_dir, is_transient
from castghld.keyring import BLOB_MAGIC, KeyRing

log = logging.getLogger("castghld.state")

STATE_FILENAME = "state.bin"
_SNAPSHOT_MAGIC = b"CGS2"
_JOURNAL_MAGIC = b"CGJ1"
_FILE_HEADER_LEN = len(_SNAPSHOT_MAGIC) + 8  # magic + generation
SNAPSHOT_CHUNK = 500  # records per snapshot frame: bounds each encryption's hold on the GIL

# Takes a record's JSON line as on disk and its decoded form: [section, key, value], or
# [section, key] for a deleted record.
Apply = Callable[[str, list[Any]], None]


class StateFiles:
    """Reads, appends to and rewrites the state's files, each write on a thread of its own: one
    for commits, one for compactions (a snapshot being written never delays a commit)."""

    def __init__(self, directory: str, keyring: KeyRing):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILENAME)
        self.keyring = keyring
        self.generation = 0  # of the snapshot on disk (0: none)
        self.snapshot_bytes = 0
        self.journal_gen = 0  # the journal that commits append to
        self._journal_fd: int | None = None
        self._journal_fd_gen = 0
        self.journal_seq = 0  # frames in the current journal (authenticated: no reordering)
        self._journal_valid_size: int | None = None  # where a torn last frame starts
        self.journal_bytes: dict[int, int] = {}  # bytes per journal generation not yet compacted
        self.stale_key = False  # load() read a frame under an older key of the ring
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "castghld-state")
        self._compactor = concurrent.futures.ThreadPoolExecutor(1, "castghld-state-compact")

    # -- reading -------------------------------------------------------------------------------

    def load(self, apply: Apply) -> tuple[bool, bool]:
        """Read and decrypt the snapshot and replay its journals, handing each record to `apply`;
        (found, rewrite): found is False when nothing is on disk yet (an empty state), rewrite is
        True when the snapshot must be written again (none yet, an older key or format).

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
            return False, True
        except OSError as e:
            raise StateError(
                f"{self.path}: cannot read state file: {e}", transient=is_transient(e)
            ) from None
        rewrite = stale_key = False
        if blob.startswith(BLOB_MAGIC):  # format 1: one encrypted JSON document
            plaintext = self.keyring.decrypt(blob, self.path, context=b"state")
            self._load_format1(plaintext, apply)
            rewrite = True
        else:
            self.generation, stale_key = self._load_snapshot(blob, apply)
            self.snapshot_bytes = len(blob)
        self.journal_gen = self.generation
        for generation, path in self._journal_files():
            if generation < self.generation:
                continue  # its records are in the snapshot; the next compaction deletes it
            stale_key |= self._replay_journal(generation, path, apply)
            self.journal_gen = generation
        self.stale_key = stale_key
        if stale_key:
            log.info("state file uses an older key; it will be re-encrypted with the newest")
            rewrite = True
        return True, rewrite

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

    def _load_format1(self, plaintext: bytes, apply: Apply) -> None:
        try:
            sections = json.loads(plaintext)["sections"]
            for section, records in sections.items():
                for key, value in records.items():
                    apply(record_line(section, key, value), [section, key, value])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StateError(
                f"{self.path}: decrypted, but the content is not castghld state"
            ) from None

    def _load_snapshot(self, blob: bytes, apply: Apply) -> tuple[int, bool]:
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
            records += _apply_lines(plaintext[1:], self.path, apply)
        raise StateError(truncated)

    def _replay_journal(self, generation: int, path: str, apply: Apply) -> bool:
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
            _apply_lines(plaintext, path, apply)
            valid = end
            applied += 1
        self.journal_seq = applied
        self._journal_valid_size = valid
        self.journal_bytes[generation] = valid
        return stale_key

    # -- writing -------------------------------------------------------------------------------

    async def append(self, plaintext: bytes) -> None:
        """Append `plaintext` (a commit's JSON lines) as the next frame of the current journal and
        fsync it, on the writer thread; OSError if it is not on disk."""
        generation, seq = self.journal_gen, self.journal_seq
        loop = asyncio.get_running_loop()
        size = await loop.run_in_executor(
            self._executor, self._append_sync, plaintext, generation, seq
        )
        self.journal_seq = seq + 1
        self.journal_bytes[generation] = size

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

    def cut(self) -> int:
        """Start journal g+1 for the commits that follow; g+1, the generation of the snapshot
        that is to hold everything committed before."""
        self.journal_gen += 1
        self.journal_seq = 0
        return self.journal_gen

    def outgrown(self, min_bytes: int) -> bool:
        """True once the journals exceed `min_bytes` and the snapshot's size: a compaction pays."""
        journals = sum(self.journal_bytes.values())
        return journals > max(min_bytes, self.snapshot_bytes)

    async def write_snapshot(self, generation: int, lines: list[str]) -> None:
        """Write snapshot `generation` of `lines` on the compaction thread; journals older than
        the cut are deleted once it is in place."""
        loop = asyncio.get_running_loop()
        size = await loop.run_in_executor(
            self._compactor, self._write_snapshot_sync, generation, lines
        )
        self.generation = generation
        self.snapshot_bytes = size
        for old in [g for g in self.journal_bytes if g < generation]:
            del self.journal_bytes[old]

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


def _apply_lines(plaintext: bytes, what: str, apply: Apply) -> int:
    """Hand each JSON line of a frame to `apply`; how many there were."""
    count = 0
    for line in plaintext.decode("utf-8").split("\n"):
        try:
            item = json.loads(line)
            if not isinstance(item, list) or len(item) not in (2, 3):
                raise ValueError
        except ValueError:
            raise StateError(f"{what}: decrypted, but the content is not castghld state") from None
        apply(line, item)
        count += 1
    return count


def record_line(section: str, key: str, value: Any) -> str:
    """A record's line as the files hold it (a snapshot's frames, a journal's commits)."""
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

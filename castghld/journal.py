"""The outbox's journal: ``outbox.log``, encrypted entries appended by one writer thread.

Guarantees:
- `Journal.append` resolves only once the entry is durably in the journal (``outbox.log`` in
  ``state.dir``, 0600, each line one AES-GCM encrypted entry under the state key); an ``OSError``
  (disk full, I/O error) means the entry was not stored.
- Group commit: entries queued while one fsync runs are written and fsynced together by the next,
  so durability costs one fsync per burst, not per message. Writes and fsyncs run off the IOLoop,
  on one writer thread, in the order they were queued.
- A failed write is cut back (``ftruncate``) so the journal never holds half a batch; a torn last
  line (crash mid-write) is dropped on load. A damaged line elsewhere (bit rot, a bad copy) does
  not keep the daemon down: at start it is moved to ``outbox.quarantine`` (0600, beside the
  journal, appended to, never read back), logged at error with the count; the rest loads. Several
  lines under one key the key file no longer holds, or any line under a key an earlier start used
  (`retired_key_ids`, from the state's key history), are a startup error naming the file and the
  key's id (restore the key: nothing is moved aside).
- Compaction (`Journal.rewrite`) replaces the journal atomically with a snapshot of what is live,
  built and encrypted on a thread of its own while appends go on; a crash at any point leaves
  either the old journal or the new one, each complete.

What the entries mean (records, updates, seen ids) is the outbox's business (`castghld.outbox`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import errno
import json
import logging
import os
import queue
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from castghld.files import TEMP_PREFIX, StateError, fsync_dir, is_transient
from castghld.keyring import KeyRing, key_id_of

log = logging.getLogger("castghld.outbox")

JOURNAL_FILENAME = "outbox.log"
QUARANTINE_FILENAME = "outbox.quarantine"
_CONTEXT = b"outbox"

Entry = dict[str, Any]  # one line of the journal: {"op": ..., "id": ..., ...}


def _lines(f: Any, path: str) -> Iterator[tuple[int, bytes]]:
    """(number, line with its newline) of an open binary file; a read error is a StateError."""
    try:
        yield from enumerate(f, 1)
    except OSError as e:
        raise StateError(
            f"{path}: cannot read the outbox: {e.strerror}", transient=is_transient(e)
        ) from None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its awaiter was cancelled: the work was done all the same
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class _WriterThread:
    """One thread that runs the journal's blocking writes, in the order they are called.

    What an executor does for `run_in_executor`, without its concurrent.futures layer: the outcome
    comes back to the IOLoop with one `call_soon_threadsafe`. A write is one such call per batch,
    so this is paid once per fsync, without the executor's concurrent.futures.Future and the asyncio
    future chained to it.
    The thread is a daemon: a write it is doing when the process ends is a torn last line, which
    the journal drops on load, as after kill -9. `shutdown` lets queued calls finish first; a
    writer dropped without it (a journal never closed) ends its thread too. A thread that cannot
    start (the unit's TasksMax, no memory) is an OSError for that call; the next call tries again.
    """

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # The thread holds the queue, not this object: dropping it ends the thread.
        weakref.finalize(self, self._jobs.put, None).atexit = False

    def call(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._thread is None:
            thread = threading.Thread(target=_work, args=(self._jobs,), name=self.name, daemon=True)
            try:
                thread.start()
            except RuntimeError:  # "can't start new thread"
                raise OSError(errno.EAGAIN, f"cannot start the {self.name} thread") from None
            self._thread = thread
        self._jobs.put((loop, future, function, args))
        return future

    def shutdown(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def _work(jobs: queue.SimpleQueue[tuple | None]) -> None:
    while (job := jobs.get()) is not None:
        _run_job(*job)
        del job  # waiting for the next one holds no journal


def _run_job(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], function: Callable, args: tuple
) -> None:
    try:
        result, error = function(*args), None
    except BaseException as e:  # handed to the awaiter, as an executor would
        result, error = None, e
    try:
        loop.call_soon_threadsafe(_resolve, future, result, error)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class Journal:
    """An append-only file of encrypted JSON entries, one per line."""

    def __init__(self, directory: str, keyring: KeyRing):
        self.path = os.path.join(directory, JOURNAL_FILENAME)
        self.keyring = keyring
        self._fd: int | None = None
        self._size = 0
        self._valid_size: int | None = None  # where a torn last line starts, set by load()
        # Numbers (1-based) of the damaged lines load() skipped; open() moves them aside.
        self.unreadable: list[int] = []
        self._torn_line = 0
        # Ids (hex) of keys earlier starts used (the state's key history): a line under one of
        # them that the ring lacks needs that key back; it is not damage.
        self.retired_key_ids: frozenset[str] = frozenset()
        self.stale_key = False  # load() read a line under an older key of the ring
        self.quarantine_path = os.path.join(directory, QUARANTINE_FILENAME)
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._writer_thread = _WriterThread("castghld-outbox")
        self._compactor = concurrent.futures.ThreadPoolExecutor(1, "castghld-outbox-compact")
        # Batches written while a compaction builds its file, to copy after it (else None).
        self._since_snapshot: list[bytes] | None = None
        self.entries_written = 0
        self.fsyncs = 0

    # -- reading -------------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every readable entry in order, read and decoded one line at a time (a replay of a
        large outbox never holds the file, its lines and all decoded entries at once). A torn
        last line is skipped (and cut away by `open`); a damaged line elsewhere is skipped,
        listed in `unreadable` and logged (`open` moves it to the quarantine file); several
        lines under one key we lack raise StateError. Reading never writes: `check-config` and
        `installs` use it."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        except OSError as e:
            raise StateError(
                f"{self.path}: cannot read the outbox: {e.strerror}", transient=is_transient(e)
            ) from None
        with f:
            yield from self._entries(f)

    def _entries(self, f: Any) -> Iterator[Entry]:
        good_size = 0
        unreadable: list[tuple[int, str]] = []
        unreadable_last = 0
        foreign: dict[str, list[int]] = {}  # line numbers by the unknown key id they name
        self.stale_key = False
        for number, raw in _lines(f, self.path):
            line = raw.rstrip(b"\n")
            if not line:
                continue
            if not raw.endswith(b"\n"):
                # No newline after it: a write that a crash cut short (never acknowledged).
                log.warning("outbox: dropping a torn last entry in %s", self.path)
                unreadable_last = number
                break
            blob = b""
            try:
                blob = base64.b64decode(line, validate=True)
                entry = json.loads(self.keyring.decrypt(blob, self.path, _CONTEXT))
                if not isinstance(entry, dict):
                    raise ValueError("not a journal entry")
            except (binascii.Error, ValueError, StateError) as e:
                if isinstance(e, StateError) and self.keyring.lacks_key_of(blob):
                    foreign.setdefault(key_id_of(blob), []).append(number)
                unreadable.append((number, str(e).removeprefix(self.path + ": ")))
                continue
            self.stale_key |= not self.keyring.is_current(blob)
            good_size += len(raw)
            yield entry
        for key_id, numbers in foreign.items():
            # A key an earlier start used, or several lines naming one unknown key: a key the
            # key file no longer holds, to restore; nothing is moved. One line naming a key
            # never seen is damage in its header.
            if len(numbers) > 1 or key_id in self.retired_key_ids:
                raise self._missing_key(key_id, numbers)
        self._valid_size = good_size if not unreadable else None
        self.unreadable = [number for number, _ in unreadable]
        self._torn_line = unreadable_last
        if unreadable:
            number, why = unreadable[0]
            log.error(
                "outbox: %d unreadable record(s) in %s (first: line %d: %s); the daemon moves "
                "them to %s at start and loads the rest",
                len(unreadable),
                self.path,
                number,
                why,
                self.quarantine_path,
            )

    def _missing_key(self, key_id: str, numbers: list[int]) -> StateError:
        ring = self.keyring
        return StateError(
            f"{self.path}: {len(numbers)} entr{'y' if len(numbers) == 1 else 'ies'} (first: line "
            f"{numbers[0]}) encrypted with key {key_id}, which is not in the key file {ring.path} "
            f"(it holds {', '.join(ring.key_ids)}); put that key back as a later line of "
            "the key file and start again: the start re-encrypts them with the newest key, and "
            "the old key can be removed after it"
        )

    def open(self) -> None:
        """Open for appending (creating it 0600), first cutting away a torn last line and
        moving the lines `load` could not read to the quarantine file."""
        if self.unreadable:
            self._quarantine()  # replaces the journal, then opens the new one
            return
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        if self._valid_size is not None and self._size > self._valid_size:
            os.ftruncate(self._fd, self._valid_size)
            os.fsync(self._fd)
            self._size = self._valid_size
        fsync_dir(os.path.dirname(self.path))

    def _quarantine(self) -> None:
        """Append the unreadable lines to the quarantine file (fsynced), then replace the journal
        by its readable lines (atomically). A crash between the two moves them again later:
        the quarantine file may hold a line twice, the journal never loses a readable one."""
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        bad = set(self.unreadable)
        moved = [lines[n - 1] for n in self.unreadable]
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.quarantine_path, flags, 0o600)
        try:
            os.write(fd, b"".join(line + b"\n" for line in moved))
            os.fsync(fd)
        finally:
            os.close(fd)
        # The torn last line goes too, as `load` skipped it.
        bad.add(self._torn_line)
        kept = [line for n, line in enumerate(lines, 1) if line and n not in bad]
        self.unreadable = []
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + "outbox-", dir=directory)  # 0600 from birth
        os.close(fd)
        self._install_sync(tmp, b"".join(line + b"\n" for line in kept))
        log.error(
            "outbox: moved %d unreadable record(s) from %s to %s",
            len(moved),
            self.path,
            self.quarantine_path,
        )

    def _encode(self, entry: Entry) -> bytes:
        plaintext = json.dumps(entry, separators=(",", ":")).encode("utf-8")
        return base64.b64encode(self.keyring.encrypt(plaintext, _CONTEXT)) + b"\n"

    # -- writing -------------------------------------------------------------------------------

    def append(self, entry: Entry) -> asyncio.Future[None]:
        """Queue `entry` now; the future resolves once it is on disk (or fails with OSError).

        The entry is queued before this returns, so a caller cancelled while awaiting the future
        does not take the write back.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.append((self._encode(entry), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_queued())
        return future

    async def _write_queued(self) -> None:
        async with self._lock:
            while self._queue:
                batch, self._queue = self._queue, []
                data = b"".join(line for line, _ in batch)
                try:
                    await self._writer_thread.call(self._write_sync, data)
                except OSError as e:
                    log.error("outbox: cannot write %s: %s", self.path, e.strerror or e)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(OSError(e.errno, e.strerror))
                    continue
                self.entries_written += len(batch)
                if self._since_snapshot is not None:
                    self._since_snapshot.append(data)
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _write_sync(self, data: bytes) -> None:
        if self._fd is None:  # a reopen failed earlier: try again, or refuse the write
            self.open()
        assert self._fd is not None
        start = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            # Never leave half a batch: the next line must start on a clean boundary.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                log.exception("outbox: cannot cut %s back after a failed write", self.path)
            raise
        self._size = start + len(data)
        self.fsyncs += 1

    async def rewrite(self, snapshot: Callable[[], Iterable[Entry]]) -> int:
        """Replace the journal atomically with the entries `snapshot()` yields (compaction).

        `snapshot` is called on the IOLoop once no batch is being written and must be cheap: it
        takes references to immutable data, and the entries it yields are built, encrypted and
        written to a temporary file on the compaction thread, so the loop is never held for the
        size of the outbox. Every entry already written is reflected in it (it reads memory,
        which is ahead of the disk). Appends go on meanwhile, to the current file, durable as
        usual; under the lock, those written since the snapshot are copied after it, then the
        new file replaces the old one. Replaying an entry twice is harmless: updates are merges.
        A crash at any point leaves either the old journal or the new one, each complete.
        """
        loop = asyncio.get_running_loop()
        async with self._lock:
            entries = snapshot()
            self._since_snapshot = []
        try:
            tmp, count = await loop.run_in_executor(
                self._compactor, self._write_snapshot_sync, entries
            )
            async with self._lock:
                tail = b"".join(self._since_snapshot)
                self._since_snapshot = None
                await self._writer_thread.call(self._install_sync, tmp, tail)
        finally:
            self._since_snapshot = None
        self.stale_key = False  # every line is now under the newest key
        return count

    def _write_snapshot_sync(self, entries: Iterable[Entry]) -> tuple[str, int]:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + "outbox-", dir=directory)  # 0600 from birth
        count = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for entry in entries:
                    f.write(self._encode(entry))
                    count += 1
        except BaseException:
            _unlink(tmp)
            raise
        return tmp, count

    def _install_sync(self, tmp: str, tail: bytes) -> None:
        try:
            with open(tmp, "ab") as f:
                f.write(tail)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            _unlink(tmp)
            raise
        # From the rename on, write only to the file now at `path`, even if the sync below fails.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._valid_size = None
        try:
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        finally:
            self.open()

    async def close(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._writer_thread.shutdown()
        self._compactor.shutdown(wait=True)

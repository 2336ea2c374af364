"""The durable outbox: every message we accepted, until it is finished, encrypted on disk.

Guarantees:
- ``add`` returns only once the record is durably in the journal (``outbox.log`` in
  ``state.dir``, 0600, each line one AES-GCM encrypted entry under the state key). A caller that
  gets an ``OSError`` (disk full, I/O error) must not acknowledge the message: nothing was stored
  and nothing will be sent.
- Group commit: entries queued while one fsync runs are written and fsynced together by the next,
  so durability costs one fsync per burst, not per message. Writes and fsyncs run off the IOLoop.
- A failed write is cut back (``ftruncate``) so the journal never holds half a batch; a torn last
  line (crash mid-write) is dropped on load. A damaged line elsewhere (bit rot, a bad copy) does
  not keep the daemon down: at start it is moved to ``outbox.quarantine`` (0600, beside the
  journal, appended to, never read back), logged at error with the count and counted in
  ``castghld_outbox_quarantined``; the rest loads. Several lines under one key the key file no
  longer holds are a startup error naming the file (restore the key: nothing is moved aside).
- Ids are unique: an id that is live or finished within ``delivery.seen_retention`` (at least 24 h)
  is reported as a duplicate and not added again, so GHL's and Cast's retries become one message.
- On start, every unfinished record is handed to its pipeline again (at-least-once dispatch); the
  pipelines make that exactly-once where the upstream allows it (Cast's idempotency key).
- Two ways to serve a kind: a `Pipeline` coroutine runs per record (inbound: low volume), a
  `Scheduler` takes records as data into its own queues served by a bounded set of workers
  (outbound: 100k waiting messages must not be 100k suspended coroutines for the GC to walk).
- Records are replaced, never mutated (``update``/``note`` build a new dict): a record handed out
  is a consistent snapshot, and compaction can encode records off the IOLoop. Values are atomic
  (str, int, float, bool, None, tuple), so the GC untracks them.
- The journal is compacted (live records + seen ids, written atomically) when it has grown well
  beyond what is live.
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
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

from castghld.metrics import Metrics
from castghld.seen import SeenIds
from castghld.state import TEMP_PREFIX, KeyRing, StateError, fsync_dir, is_transient

log = logging.getLogger("castghld.outbox")

JOURNAL_FILENAME = "outbox.log"
QUARANTINE_FILENAME = "outbox.quarantine"
_CONTEXT = b"outbox"
COMPACT_MIN_ENTRIES = 2000
# Back-off while the journal cannot be written (a pipeline step that must persist its progress).
PERSIST_RETRY = (1.0, 30.0)
# Back-off of a pipeline that failed unexpectedly (a bug, or an upstream answer we did not foresee).
PIPELINE_RETRY = (30.0, 600.0)

Record = dict[str, Any]
Pipeline = Callable[["Outbox", str], Awaitable[None]]


class Scheduler(Protocol):
    """Serves a kind of record as data: queued by `dispatch`, worked on by its own workers."""

    def start(self, outbox: Outbox) -> None:
        """Called once by `Outbox.start`, before the unfinished records are dispatched."""

    def dispatch(self, outbox: Outbox, rid: str) -> None:
        """Take `rid` (a live record) into the queues unless already held; never blocks."""

    def holds(self, rid: str) -> bool:
        """True while `rid` is queued, waiting for a due time, or being worked on."""

    @property
    def active(self) -> int:
        """How many records are held."""

    async def wait_idle(self) -> None:
        """Until no record is held."""

    async def stop(self) -> None:
        """Stop every worker where it is (progress that matters is in the journal)."""


# Values shared by many records: one string object each after a load, as after `add`.
_SHARED_VALUES = frozenset({"kind", "stage", "type", "location_id", "account", "sender_id"})


def _loaded(record: Record) -> Record:
    """A record (or update fields) read from the journal: GC-untrackable (lists become tuples),
    with its keys and the values repeated across records interned. `json.loads` makes a new
    string of every key of every object (~60 bytes each); a replay of 100k records kept ~50 MB
    of duplicate key strings alive. Built one record at a time: the old dict is freed at once."""
    loaded = {}
    for key, value in record.items():
        if type(value) is list:
            value = tuple(value)
        elif key in _SHARED_VALUES and type(value) is str:
            value = sys.intern(value)
        loaded[sys.intern(key)] = value
    return loaded


def atomic(record: Record) -> Record:
    """`record` with JSON lists as tuples, so it holds atomic values only (GC-untrackable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


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
    so this is paid once per fsync (profiled: about a third less CPU per batch than the executor).
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

    def load(self) -> list[Record]:
        """Every readable entry in order (see `entries`)."""
        return list(self.entries())

    def entries(self) -> Iterator[Record]:
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

    def _entries(self, f: Any) -> Iterator[Record]:
        good_size = 0
        unreadable: list[tuple[int, str]] = []
        unreadable_last = 0
        foreign: dict[bytes, list[str]] = {}  # lines by the unknown key they name
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
                    foreign.setdefault(blob[:12], []).append(f"{self.path}: line {number}: {e}")
                unreadable.append((number, str(e).removeprefix(self.path + ": ")))
                continue
            good_size += len(raw)
            yield entry
        for problems in foreign.values():
            # One line naming an unknown key is damage in its header; several are a key that
            # the key file no longer holds: the operator must restore it, nothing is moved.
            if len(problems) > 1:
                raise StateError(problems[0])
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

    def _encode(self, entry: Record) -> bytes:
        plaintext = json.dumps(entry, separators=(",", ":")).encode("utf-8")
        return base64.b64encode(self.keyring.encrypt(plaintext, _CONTEXT)) + b"\n"

    # -- writing -------------------------------------------------------------------------------

    def append(self, entry: Record) -> asyncio.Future[None]:
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

    async def rewrite(self, snapshot: Callable[[], Iterable[Record]]) -> int:
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
        return count

    def _write_snapshot_sync(self, entries: Iterable[Record]) -> tuple[str, int]:
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


class Outbox:
    """Live records by id, the seen ids, and their dispatch: a task per record of a `Pipeline`
    kind, the queues of a `Scheduler` kind."""

    def __init__(self, directory: str, keyring: KeyRing, metrics: Metrics, seen_retention: float):
        self.journal = Journal(directory, keyring)
        self.metrics = metrics
        self.seen_retention = seen_retention
        self.records: dict[str, Record] = {}
        # The ids of `records` per kind, in the order they were accepted: counts and the oldest
        # waiting message for /metrics without a pass over 100k records on the loop.
        self._by_kind: dict[str, dict[str, None]] = {}
        self.seen = SeenIds(seen_retention)
        self.pipelines: dict[str, Pipeline | Scheduler] = {}
        self._adding: dict[str, asyncio.Future[None]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._entries_since_compaction = 0
        self._compaction: asyncio.Task | None = None
        self.stopping = False
        self.restarted = False  # the journal had entries: an earlier process ran on this state
        metrics.before_scrape.append(self.update_metrics)

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Replay the journal (synchronous, read-only: at startup, before serving)."""
        # The window first: the merges that the replay runs drop expired ids and cap hours from
        # a clock that ran years ahead (see SeenIds._ceiling), instead of raising ids to them.
        self._prune_seen()
        count = 0
        for count, entry in enumerate(self.journal.entries(), 1):  # noqa: B007
            op, rid = entry.get("op"), entry.get("id")
            if op == "put":
                self._keep(rid, _loaded(entry["record"]))
            elif op == "update" and rid in self.records:
                self.records[rid] = {**self.records[rid], **_loaded(entry["fields"])}
            elif op == "done":
                self._forget(rid)
                self.seen.add(rid, entry["at"])
            elif op in ("seen_run", "seen", "seen_hashes"):
                self.seen.load_entry(entry)
        self.restarted = count > 0
        self._entries_since_compaction = count
        self._prune_seen()

    async def start(self) -> None:
        try:
            self.journal.open()
        except OSError as e:
            raise StateError(
                f"{self.journal.path}: cannot open the outbox for writing: {e.strerror}",
                transient=is_transient(e),
            ) from None
        for scheduler in self._schedulers():
            scheduler.start(self)
        for rid in list(self.records):
            self._dispatch(rid)
        if self.records:
            log.info("outbox: resuming %d unfinished message(s)", len(self.records))
        # Cut a long replayed journal down, in the background: the loop serves meanwhile.
        self._maybe_compact()

    async def stop(self) -> None:
        """Stop every pipeline where it is (its progress is on disk) and close the journal.

        The daemon first lets Cast sends in flight finish (bounded), so a stop rarely leaves a
        message whose send Cast accepted but we did not record; if it does, the restart sends it
        again with the same idempotency key and Cast replays its first answer.
        """
        self.stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for scheduler in self._schedulers():
            await scheduler.stop()
        if self._compaction is not None:
            await self._compaction  # bounded by one pass over the live records; never raises
        await self.journal.close()

    def update_metrics(self) -> None:
        for kind in ("outbound", "inbound"):
            self.metrics.outbox_pending.labels(kind).set(len(self._by_kind.get(kind, ())))

    def oldest(self, kind: str) -> Record | None:
        """The unfinished record of `kind` that was accepted first, or None (O(1))."""
        for rid in self._by_kind.get(kind, ()):
            return self.records[rid]
        return None

    def _keep(self, rid: str, record: Record) -> None:
        self.records[rid] = record
        self._by_kind.setdefault(record.get("kind", "outbound"), {})[rid] = None

    def _forget(self, rid: str) -> None:
        record = self.records.pop(rid, None)
        if record is not None:
            self._by_kind.get(record.get("kind", "outbound"), {}).pop(rid, None)

    # -- records -------------------------------------------------------------------------------

    def known(self, rid: str) -> bool:
        """True once `rid` is durably stored (live or finished); not while its write runs."""
        if rid in self._adding:
            return False
        return rid in self.records or rid in self.seen

    async def add(self, rid: str, record: Record) -> bool:
        """Store `record` durably and dispatch it; False if `rid` is a duplicate.

        Raises OSError if it could not be stored: then it is not kept and not dispatched. A
        caller cancelled while the write runs does not change that: the write goes on, and its
        outcome (dispatched, or forgotten) is settled when it ends, not when the caller resumes.
        """
        pending = self._adding.get(rid)
        if pending is not None:  # the same id arrived while its first copy is being written
            await asyncio.shield(pending)
            return False
        if self.known(rid):
            return False
        record = atomic(record)
        self._keep(rid, record)
        future = self.journal.append({"op": "put", "id": rid, "record": record})
        self._adding[rid] = future
        future.add_done_callback(lambda _: self._added(rid, future))  # runs before the caller
        await asyncio.shield(future)
        return True

    def _added(self, rid: str, future: asyncio.Future[None]) -> None:
        del self._adding[rid]
        if future.cancelled() or future.exception() is not None:
            self._forget(rid)
            return
        self._entries_since_compaction += 1
        if rid in self.records:  # else dropped meanwhile (castghld outbox drop)
            self._dispatch(rid)

    async def update(self, rid: str, **fields: Any) -> None:
        """Merge `fields` into the record, durably; retried until the journal takes it."""
        self.note(rid, **fields)
        await self._persist({"op": "update", "id": rid, "fields": fields})

    def note(self, rid: str, **fields: Any) -> None:
        """Merge `fields` into the record in memory only: progress that a crash may lose because
        the restart redoes that step harmlessly (a status poll, a report)."""
        self.records[rid] = {**self.records[rid], **atomic(fields)}

    async def finish(self, rid: str) -> None:
        """The record is done: forget it, remember its id for `seen_retention`."""
        now = time.time()
        # Memory first, as for every change: a compaction snapshot taken while the entry is
        # being written must not bring the record back.
        self._forget(rid)
        self.seen.add(rid, now)
        await self._persist({"op": "done", "id": rid, "at": now})
        self._maybe_compact()

    async def _persist(self, entry: Record) -> None:
        delay = PERSIST_RETRY[0]
        while True:
            try:
                await asyncio.shield(self.journal.append(entry))
                self._entries_since_compaction += 1
                return
            except OSError as e:
                log.error(
                    "outbox: cannot persist progress of %s (%s); retrying in %.0fs",
                    entry["id"],
                    e.strerror,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, PERSIST_RETRY[1])

    # -- dispatch ------------------------------------------------------------------------------

    def _schedulers(self) -> list[Scheduler]:
        # Not isinstance(p, Scheduler): a runtime Protocol check costs ~20 us, on every ack.
        return [p for p in self.pipelines.values() if hasattr(p, "dispatch")]

    def _dispatch(self, rid: str) -> None:
        if self.stopping or rid in self._tasks:
            return
        pipeline = self.pipelines[self.records[rid]["kind"]]
        dispatch = getattr(pipeline, "dispatch", None)
        if dispatch is not None:  # a Scheduler
            dispatch(self, rid)
            return
        task = asyncio.ensure_future(self._run(pipeline, rid))
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._tasks.pop(rid, None))

    async def _run(self, pipeline: Pipeline, rid: str) -> None:
        delay = PIPELINE_RETRY[0]
        while True:
            try:
                await pipeline(self, rid)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never lose the message to an unexpected error: it stays in the outbox and its
                # pipeline resumes from its last recorded stage, here after a pause or at restart.
                log.exception("outbox: pipeline failed for %s; retrying in %.0fs", rid, delay)
            await asyncio.sleep(delay)
            if rid not in self.records:
                return
            delay = min(delay * 2, PIPELINE_RETRY[1])

    def redispatch(self, kind: str) -> int:
        """Start pipelines again for live records of `kind` that wait (for an install)."""
        count = 0
        for rid in list(self._by_kind.get(kind, ())):
            if not self._held(rid):
                self._dispatch(rid)
                count += 1
        return count

    def _held(self, rid: str) -> bool:
        return rid in self._tasks or any(s.holds(rid) for s in self._schedulers())

    @property
    def running(self) -> int:
        """How many records have a pipeline running or are held by a scheduler (the rest wait
        for a restart)."""
        return len(self._tasks) + sum(s.active for s in self._schedulers())

    async def wait_idle(self) -> None:
        """Wait until no pipeline runs and no scheduler holds a record (tests and the demo)."""
        while self._tasks or any(s.active for s in self._schedulers()):
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
            for scheduler in self._schedulers():
                await scheduler.wait_idle()

    # -- compaction ----------------------------------------------------------------------------

    def _prune_seen(self) -> None:
        self.seen.prune(time.time())

    def _maybe_compact(self) -> None:
        # A compaction writes every live record and every seen id (a few dozen bytes each): run
        # it when the journal has grown by several times what it would write.
        threshold = max(COMPACT_MIN_ENTRIES, 4 * len(self.records), len(self.seen) // 4)
        if self._entries_since_compaction >= threshold:
            self._start_compaction()

    def _start_compaction(self) -> None:
        if self._compaction is None or self._compaction.done():
            self._compaction = asyncio.ensure_future(self.compact())

    def _snapshot(self) -> Iterator[Record]:
        """Called on the loop: copies references only; the entries are built on the compaction
        thread from those (records are immutable, see `note`)."""
        self._prune_seen()
        seen = self.seen.entries()
        # A record whose `put` is still queued is not durable yet: its entry lands after the
        # snapshot (in the copied tail) if it is written, and nowhere if the write fails.
        # Only the (few) unwritten ids are picked out here; the loop over every record runs on
        # the compaction thread. A dict copy is one object: 100k waiting records cost ~4 ms here,
        # where a list of 100k (id, record) tuples costs 30-90 ms, mostly in the GC passes that
        # 100k new tracked tuples set off.
        unwritten = {
            rid
            for rid, future in self._adding.items()
            if not (future.done() and future.exception() is None)
        }
        records = self.records.copy()

        def entries() -> Iterator[Record]:
            yield from seen
            for rid, record in records.items():
                if rid not in unwritten:
                    yield {"op": "put", "id": rid, "record": record}

        return entries()

    async def compact(self) -> None:
        try:
            written = await self.journal.rewrite(self._snapshot)
        except OSError as e:
            log.error("outbox: compaction failed (%s); the journal keeps growing", e.strerror)
            return
        self._entries_since_compaction = written

    # -- operator actions (castghld outbox retry/drop, through the admin socket) ---------------

    def retry(self, rid: str) -> bool:
        """Dispatch a waiting record now; False if a pipeline or scheduler already holds it (it
        goes on by itself: its backoff or pacing decides when)."""
        if rid not in self.records or self._held(rid):
            return False
        self._dispatch(rid)
        return True

    async def drop(self, rid: str) -> bool:
        """Forget a live record for good (its id stays seen, so a retry of the same webhook is
        still a duplicate); a pipeline running it is cancelled first. False if unknown."""
        if rid not in self.records:
            return False
        task = self._tasks.get(rid)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.finish(rid)
        return True

"""The durable outbox: every message we accepted, until it is finished, encrypted on disk.

Guarantees:
- ``add`` returns only once the record is durably in the journal (`castghld.journal`: group
  commit, torn and damaged lines, quarantine). A caller that gets an ``OSError`` (disk full, I/O
  error) must not acknowledge the message: nothing was stored and nothing will be sent. Damaged
  lines moved aside at start are counted in ``castghld_outbox_quarantined``.
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
  beyond what is live, and at start when it holds an entry under an older key than the newest
  (key rotation), before any record is dispatched.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from castghld.files import StateError, is_transient
from castghld.journal import Journal
from castghld.keyring import KeyRing
from castghld.metrics import Metrics
from castghld.outbox_compaction import OutboxCompaction
from castghld.seen import SeenIds

log = logging.getLogger("castghld.outbox")

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
    string of every key of every object (~60 bytes each): without interning, a replayed backlog
    holds a copy of every key per record. Built one record at a time: the old dict is freed at
    once."""
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


class RecordIndex:
    """The ids of the live records per kind, in the order they were accepted (counts and the
    oldest waiting message for /metrics), and per ``location_id`` (what a departing location
    leaves behind): found without a pass over 100k records on the loop."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, None]] = {}
        self.locations: dict[str, dict[str, None]] = {}

    def add(self, rid: str, record: Record) -> None:
        self.kinds.setdefault(record.get("kind", "outbound"), {})[rid] = None
        location_id = record.get("location_id")
        if location_id:
            self.locations.setdefault(location_id, {})[rid] = None

    def remove(self, rid: str, record: Record) -> None:
        self.kinds.get(record.get("kind", "outbound"), {}).pop(rid, None)
        location_id = record.get("location_id")
        ids = self.locations.get(location_id) if location_id else None
        if ids is not None:
            ids.pop(rid, None)
            if not ids:
                del self.locations[location_id]


class Outbox:
    """Live records by id, the seen ids, and their dispatch: a task per record of a `Pipeline`
    kind, the queues of a `Scheduler` kind."""

    def __init__(self, directory: str, keyring: KeyRing, metrics: Metrics, seen_retention: float):
        self.journal = Journal(directory, keyring)
        self.metrics = metrics
        self.seen_retention = seen_retention
        self.records: dict[str, Record] = {}
        self._index = RecordIndex()
        self.seen = SeenIds(seen_retention)
        self.pipelines: dict[str, Pipeline | Scheduler] = {}
        self._adding: dict[str, asyncio.Future[None]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.compaction = OutboxCompaction(self.journal, self.records, self.seen, self._adding)
        self.stopping = False
        self.restarted = False  # the journal had entries: an earlier process ran on this state
        # (rid, record or None) after a record is added, replaced or forgotten, except by `load`:
        # indexes kept beside the records (castghld.credits).
        self.watchers: list[Callable[[str, Record | None], None]] = []
        metrics.before_scrape.append(self.update_metrics)

    # -- lifecycle -----------------------------------------------------------------------------

    def load(self) -> None:
        """Replay the journal (synchronous, read-only: at startup, before serving)."""
        # The window first: the merges that the replay runs drop expired ids and cap hours from
        # a clock that ran years ahead (see SeenIds._ceiling), instead of raising ids to them.
        self.compaction.prune_seen()
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
        self.compaction.entries_since = count
        self.compaction.prune_seen()

    async def start(self) -> None:
        try:
            self.journal.open()
        except OSError as e:
            raise StateError(
                f"{self.journal.path}: cannot open the outbox for writing: {e.strerror}",
                transient=is_transient(e),
            ) from None
        if self.journal.stale_key:
            await self.compaction.reencrypt()
        for scheduler in self._schedulers():
            scheduler.start(self)
        for rid in list(self.records):
            self._dispatch(rid)
        if self.records:
            log.info("outbox: resuming %d unfinished message(s)", len(self.records))
        # Cut a long replayed journal down, in the background: the loop serves meanwhile.
        self.compaction.maybe_compact()

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
        if self.compaction.task is not None:
            await self.compaction.task  # bounded by one pass over the live records; never raises
        await self.journal.close()

    def update_metrics(self) -> None:
        for kind in ("outbound", "inbound"):
            self.metrics.outbox_pending.labels(kind).set(len(self._index.kinds.get(kind, ())))

    def oldest(self, kind: str) -> Record | None:
        """The unfinished record of `kind` that was accepted first, or None (O(1))."""
        for rid in self._index.kinds.get(kind, ()):
            return self.records[rid]
        return None

    def ids_of_location(self, location_id: str) -> list[str]:
        """The live records whose ``location_id`` is `location_id` (O(their number))."""
        return list(self._index.locations.get(location_id, ()))

    def _keep(self, rid: str, record: Record) -> None:
        self.records[rid] = record
        self._index.add(rid, record)
        for watcher in self.watchers:
            watcher(rid, record)

    def _forget(self, rid: str) -> None:
        record = self.records.pop(rid, None)
        if record is not None:
            self._index.remove(rid, record)
            for watcher in self.watchers:
                watcher(rid, None)

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
        self.compaction.entries_since += 1
        if rid in self.records:  # else dropped meanwhile (castghld outbox drop)
            self._dispatch(rid)

    async def update(self, rid: str, **fields: Any) -> None:
        """Merge `fields` into the record, durably; retried until the journal takes it."""
        self.note(rid, **fields)
        await self._persist({"op": "update", "id": rid, "fields": fields})

    def note(self, rid: str, **fields: Any) -> None:
        """Merge `fields` into the record in memory only: progress that a crash may lose because
        the restart redoes that step harmlessly (a status poll, a report)."""
        record = self.records[rid] = {**self.records[rid], **atomic(fields)}
        for watcher in self.watchers:
            watcher(rid, record)

    async def finish(self, rid: str) -> None:
        """The record is done: forget it, remember its id for `seen_retention`."""
        now = time.time()
        # Memory first, as for every change: a compaction snapshot taken while the entry is
        # being written must not bring the record back.
        self._forget(rid)
        self.seen.add(rid, now)
        await self._persist({"op": "done", "id": rid, "at": now})
        self.compaction.maybe_compact()

    async def finish_many(self, rids: list[str]) -> None:
        """`finish` each of `rids`, their ``done`` entries written together (one group commit
        for a departing location's thousands of messages, not one fsync each)."""
        now = time.time()
        for rid in rids:
            self._forget(rid)
            self.seen.add(rid, now)
        await asyncio.gather(*(self._persist({"op": "done", "id": r, "at": now}) for r in rids))
        self.compaction.maybe_compact()

    async def _persist(self, entry: Record) -> None:
        delay = PERSIST_RETRY[0]
        while True:
            try:
                await asyncio.shield(self.journal.append(entry))
                self.compaction.entries_since += 1
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
        # hasattr, not isinstance(p, Scheduler): a runtime-checkable Protocol's isinstance inspects
        # every member of the protocol, and this runs on every ack.
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
        for rid in list(self._index.kinds.get(kind, ())):
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

    async def compact(self) -> None:
        """Rewrite the journal as the live records and seen ids (`OutboxCompaction.compact`)."""
        await self.compaction.compact()

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

"""The compaction of the outbox's journal: when it is worth it, and the snapshot it writes.

Guarantees:
- The journal is compacted (live records + seen ids, written atomically by `Journal.rewrite`)
  when it has grown well beyond what is live, and at start when it holds an entry under an older
  key than the newest (key rotation), before any record is dispatched.
- A record whose ``put`` is not yet durable is not in the snapshot: it lands after it if written.
- One compaction at a time; a failed one leaves the old journal, complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

from castghld.journal import Journal
from castghld.seen import SeenIds

log = logging.getLogger("castghld.outbox")

COMPACT_MIN_ENTRIES = 2000

Record = dict[str, Any]


class OutboxCompaction:
    """The compaction of one `Outbox`'s journal (the outbox owns it; `records`, `seen` and
    `adding` are the outbox's own, read here)."""

    def __init__(
        self,
        journal: Journal,
        records: dict[str, Record],
        seen: SeenIds,
        adding: dict[str, asyncio.Future[None]],
    ):
        self.journal = journal
        self.records = records
        self.seen = seen
        self._adding = adding
        # Journal entries written since the last compaction (at start: those replayed).
        self.entries_since = 0
        self.task: asyncio.Task | None = None

    def prune_seen(self) -> None:
        self.seen.prune(time.time())

    def maybe_compact(self) -> None:
        # A compaction writes every live record and every seen id (a few dozen bytes each): run
        # it when the journal has grown by several times what it would write.
        threshold = max(COMPACT_MIN_ENTRIES, 4 * len(self.records), len(self.seen) // 4)
        if self.entries_since >= threshold:
            self._start()

    def _start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.compact())

    def _snapshot(self) -> Iterator[Record]:
        """Called on the loop: copies references only; the entries are built on the compaction
        thread from those (records are immutable, see `Outbox.note`)."""
        self.prune_seen()
        seen = self.seen.entries()
        # A record whose `put` is still queued is not durable yet: its entry lands after the
        # snapshot (in the copied tail) if it is written, and nowhere if the write fails.
        # Only the (few) unwritten ids are picked out here; the loop over every record runs on
        # the compaction thread. A dict copy is one C-level copy that allocates nothing
        # per record; a list of (id, record) tuples would allocate one GC-tracked tuple per
        # waiting record on the loop and set off GC passes that grow with the backlog.
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

    async def reencrypt(self) -> None:
        """A start under a new first key: rewrite the journal with it before any dispatch (a
        compaction; a failure leaves the old journal, complete, and the older key needed)."""
        await self.compact()
        path, key = self.journal.path, self.journal.keyring.key_ids[0]
        if self.journal.stale_key:
            log.error("outbox: %s still holds entries under an older key than %s", path, key)
        else:
            log.info("outbox: re-encrypted %s with the newest key %s", path, key)

    async def compact(self) -> None:
        try:
            written = await self.journal.rewrite(self._snapshot)
        except OSError as e:
            log.error("outbox: compaction failed (%s); the journal keeps growing", e.strerror)
            return
        self.entries_since = written

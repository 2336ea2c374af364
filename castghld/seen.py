"""The ids of finished messages (the outbox's dedupe memory), in about 10 bytes per id.

Guarantees:
- ``rid in seen`` is true for every id added at a time no older than ``retention`` before the
  last ``prune`` (ids are kept with their hour, rounded up: an id may stay up to an hour longer,
  and until a merge or a prune drops it). A false positive needs two ids with equal 64-bit
  hashes: with 1M ids stored, about one chance in 10^13 per new id (taken for a duplicate).
- Memory: ids since the last seal sit in a dict (at most ``seal_size``, 4,096); sealed ids are
  segments of sorted 64-bit hashes (``array('q')``) with their hour (``array('H')``, offsets from
  a base hour per chunk), in chunks of ``CHUNK`` ids: 10 bytes per id, untracked by the GC; 1M
  ids take about 11 MB. A merge releases each chunk of its sources once consumed, so merging
  needs a chunk or two more, never a second copy of what it merges.
- Few segments (LSM, like timsort's run stack): each segment is more than ``RATIO`` times the size
  of the next newer one, or the pair is merged; so N ids are at most log2(N / seal_size) + 1
  segments plus the seals that arrive while a merge runs (a merge in progress counts as its
  output so far and the rest of each source). A lookup is two bisections per segment.
- Expiry: ``prune`` drops whole segments whose newest id is older than ``retention`` and the
  expired recent ids; merges drop the expired ids of what they merge; a segment whose sampled
  hours say a quarter or more of it expired is rewritten alone. Stale ids held beyond the
  window are a bounded share of the store, even after an id finished while the clock ran years
  ahead (its hour is capped 16 bits past the horizon, see `SeenIds._ceiling`).
- No step holds the loop long: a merge advances in slices of at most ``step`` ids (2,048, a few
  ms), one slice per ``step / MERGE_CREDIT`` adds (each add earns credit for ``MERGE_CREDIT`` ids
  of merging, several times the amortised need), so no caller ever runs a whole merge; a seal
  sorts at most ``seal_size`` ids (a few ms).
- Chunks are never changed once built and a segment's chunk list is replaced, not edited: a
  snapshot (`entries`) taken on the loop can be encoded on another thread while merges go on.
- Persistence: merges change memory only. The store reaches disk as the journal entries that
  `entries` yields for a compaction (the outbox writes them atomically: a crash leaves the old
  journal or the new one, never a store with ids missing) and as the ``done`` entries the outbox
  appends, which `add` replays.
"""

from __future__ import annotations

import array
import base64
import bisect
import hashlib
import math
import operator
import sys
from collections.abc import Iterator
from typing import Any

SEAL_SIZE = 4096
STEP = 2048  # ids per merge slice
MERGE_CREDIT = 32  # ids of merge work each add earns
CHUNK = 32768  # ids per chunk of a merged segment (and per journal entry)
RATIO = 2
PURGE_SHARE = 0.25  # sampled expired share that gets a segment rewritten alone
SAMPLE = 64  # hours sampled per segment for that estimate
MAX_OFFSET = 0xFFFF
_NO_HORIZON = -(1 << 62)
_NEVER = 1 << 62

# (sorted hashes, hour offsets, base hour): never changed once built.
Chunk = tuple[array.array, array.array, int]


def id_hash(rid: str) -> int:
    digest = hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def hour_of(at: float) -> int:
    """The hour an id added at `at` is kept with: rounded up, so it is never forgotten early."""
    return math.ceil(at / 3600.0)


def _to_bytes(values: array.array) -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array.array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def _from_bytes(typecode: str, data: bytes) -> array.array:
    values = array.array(typecode)
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


class _Segment:
    """Ids in hash order, as a list of chunks; replaced as a whole, never edited."""

    __slots__ = ("_sample", "chunks", "fences", "newest", "size")

    def __init__(self, chunks: list[Chunk], newest: int):
        self.chunks = chunks
        self.fences = [hashes[0] for hashes, _, _ in chunks]
        self.size = sum(len(hashes) for hashes, _, _ in chunks)
        self.newest = newest  # no id in it is newer (an upper bound)
        self._sample: list[int] | None = None

    def __contains__(self, h: int) -> bool:
        i = bisect.bisect_right(self.fences, h) - 1
        if i < 0:
            return False
        hashes = self.chunks[i][0]
        j = bisect.bisect_left(hashes, h)
        return j < len(hashes) and hashes[j] == h

    def expired_share(self, horizon: int) -> float:
        """Estimated share of ids older than `horizon`, from a strided sample of their hours
        (the ids are in hash order, so it is a random sample)."""
        if self._sample is None:
            stride = max(1, self.size // SAMPLE)
            self._sample = sorted(
                base + offset for _, hours, base in self.chunks for offset in hours[::stride]
            )
        if not self._sample:
            return 0.0
        return bisect.bisect_left(self._sample, horizon) / len(self._sample)


def _chunk_newest(chunk: Chunk) -> int:
    return chunk[2] + max(chunk[1])


def _sealed(recent: dict[int, int], ceiling: int = _NEVER) -> _Segment:
    """A one-chunk segment of the ids in `recent` (hash -> hour), hours over `ceiling` lowered
    to it (see `SeenIds._ceiling`)."""
    keys = sorted(recent)
    hours = [min(recent[h], ceiling) for h in keys]
    oldest, newest = min(hours), max(hours)
    base = max(oldest, newest - MAX_OFFSET)  # raising an hour keeps its id longer, never shorter
    if oldest < base:
        hours = [max(hour, base) for hour in hours]
    offsets = array.array("H", map((-base).__add__, hours))
    return _Segment([(array.array("q", keys), offsets, base)], newest)


class _Merge:
    """Merges adjacent segments (or rewrites one) into one, dropping ids older than `horizon`, a
    slice at a time. Between slices the merge is seen as `views`: its output so far and the rest
    of each source (a chunk partly merged stays whole until it is consumed): every id is in one
    of them, and each consumed chunk of a source is released."""

    def __init__(self, sources: list[_Segment], horizon: int, ceiling: int = _NEVER):
        # Own copies of the chunk lists: a consumed chunk is dropped from them (None).
        self.sources = [(list(s.chunks), s.newest) for s in sources]
        self.cursors = [[0, 0] for _ in sources]  # chunk index, position in it
        self.horizon = horizon
        # Hours over `ceiling` are lowered to it (see `SeenIds._ceiling`), then hours older
        # than the base raised to it: each fits 16 bits, none kept shorter than its window.
        self.newest = min(max(s.newest for s in sources), ceiling)
        self.base = max(horizon, self.newest - MAX_OFFSET)
        self.done: list[Chunk] = []
        self.views: list[_Segment] = list(sources)

    def step(self, budget: int) -> bool:
        """Merge up to about `budget` more ids; True once every source is consumed."""
        share = max(1, budget // len(self.sources))
        live = []  # (chunks, cursor, chunk, end)
        for (chunks, _), cursor in zip(self.sources, self.cursors, strict=True):
            if cursor[0] < len(chunks):
                chunk = chunks[cursor[0]]
                live.append((chunks, cursor, chunk, min(cursor[1] + share, len(chunk[0]))))
        # Take every id up to the smallest last hash of the sources that have more after this
        # slice, so the slices come out in order.
        bounds = [
            chunk[0][end - 1]
            for chunks, cursor, chunk, end in live
            if end < len(chunk[0]) or cursor[0] + 1 < len(chunks)
        ]
        pairs: list[tuple[int, int]] = []
        for chunks, cursor, chunk, end in live:
            hashes, hours, base = chunk
            if bounds:
                end = bisect.bisect_right(hashes, min(bounds), cursor[1], end)
            pairs += zip(
                hashes[cursor[1] : end], map(base.__add__, hours[cursor[1] : end]), strict=True
            )
            cursor[1] = end
            if end == len(hashes):
                chunks[cursor[0]] = None  # consumed: released once no view holds it
                cursor[0] += 1
                cursor[1] = 0
        if len(live) > 1:
            pairs.sort()
        self._emit(pairs)
        finished = all(
            c[0] == len(chunks) for (chunks, _), c in zip(self.sources, self.cursors, strict=True)
        )
        self.views = [_Segment(list(self.done), self.newest)] if self.done else []
        for (chunks, newest), (index, _) in zip(self.sources, self.cursors, strict=True):
            if index < len(chunks):
                self.views.append(_Segment(chunks[index:], newest))
        return finished

    def _emit(self, pairs: list[tuple[int, int]]) -> None:
        base, horizon = self.base, self.horizon
        kept = [pair for pair in pairs if pair[1] >= horizon]
        keys = [h for h, _ in kept]
        if any(map(operator.eq, keys, keys[1:])):
            # The same id twice (replayed): keep it once, with its later hour. (Twice across
            # two slices stays twice, in order: the next merge of the segment keeps one.)
            latest: dict[int, int] = {}
            for h, hour in kept:
                latest[h] = max(hour, latest.get(h, hour))
            kept = [(h, latest.pop(h)) for h, _ in kept if h in latest]
            keys = [h for h, _ in kept]
        top = self.newest
        if base > horizon or any(hour > top for _, hour in kept):
            offsets = [min(max(hour, base), top) - base for _, hour in kept]
        else:
            offsets = [hour - base for _, hour in kept]
        hashes, hours = array.array("q", keys), array.array("H", offsets)
        if not hashes:
            return
        # The last chunk grows to CHUNK ids by replacement (a snapshot may be reading it).
        if self.done and len(self.done[-1][0]) < CHUNK:
            previous = self.done.pop()
            hashes, hours = previous[0] + hashes, previous[1] + hours
        self.done.append((hashes, hours, base))


class SeenIds:
    def __init__(self, retention: float, seal_size: int = SEAL_SIZE, step: int = STEP):
        self.retention = retention
        self.seal_size = seal_size
        self.step = step
        self._recent: dict[int, int] = {}  # hash -> hour
        self._recent_oldest = _NEVER
        self._segments: list[_Segment] = []  # oldest (and largest) first
        self._merge: _Merge | None = None
        self._credit = 0
        self._horizon = _NO_HORIZON  # hours before this one are expired (set by prune)
        # A segment being read back from the journal: [entry's segment key, next part, chunks].
        self._loading: list[Any] | None = None

    def __contains__(self, rid: str) -> bool:
        if self._loading is not None:
            self._flush_loading()
        h = id_hash(rid)
        if h in self._recent:
            return True
        return any(h in segment for segment in self._segments)

    def __len__(self) -> int:
        """Ids held, expired ones not yet dropped included (during a merge, the chunks it is
        reading count twice)."""
        return len(self._recent) + sum(s.size for s in self._segments)

    @property
    def segments(self) -> int:
        return len(self._segments)

    def nbytes(self) -> int:
        """Bytes allocated by the sealed segments' arrays (the bulk of the store)."""
        chunks = {id(c): c for s in self._segments for c in s.chunks}
        return sum(a.buffer_info()[1] * a.itemsize for c in chunks.values() for a in c[:2])

    def add(self, rid: str, at: float) -> None:
        self._add(id_hash(rid), hour_of(at))
        self._work(MERGE_CREDIT)

    def _add(self, h: int, hour: int) -> None:
        recent = self._recent
        if recent.get(h, hour) > hour:
            return
        recent[h] = hour
        if hour < self._recent_oldest:
            self._recent_oldest = hour
        if len(recent) >= self.seal_size:
            self.seal()

    def seal(self) -> None:
        """Turn the recent ids into a sorted segment."""
        if not self._recent:
            return
        self._segments.append(_sealed(self._recent, self._ceiling()))
        self._recent = {}
        self._recent_oldest = _NEVER
        self._plan()

    def prune(self, now: float) -> None:
        """Forget the ids older than `retention`: whole segments and recent ids now, the rest in
        the merges that follow (see the module docstring)."""
        if self._loading is not None:
            self._flush_loading()
        horizon = hour_of(now - self.retention)
        self._horizon = horizon
        merging = self._merge.views if self._merge is not None else ()
        if any(s.newest < horizon and s not in merging for s in self._segments):
            self._segments = [s for s in self._segments if s.newest >= horizon or s in merging]
        if self._recent_oldest < horizon:
            self._recent = {h: hour for h, hour in self._recent.items() if hour >= horizon}
            self._recent_oldest = min(self._recent.values(), default=_NEVER)
        self._plan()

    def _ceiling(self) -> int:
        """The latest hour an id is kept with: 16 bits (7.5 years) after the horizon. An id's
        hour is later than that only if the clock ran years ahead when it finished (a `done`
        entry's `at`); kept with its own hour, it would make every id merged with it raised to
        within 16 bits of it, so that none of them ever expires. Lowered to the ceiling, it is
        still kept years longer than any window up to a quarter of that span (the check below;
        a longer window is not capped). A true hour passes the ceiling only if `prune` was not
        called for over 5 years (the outbox prunes at start and at each compaction, at least
        every 2,000 journal entries)."""
        if self._horizon == _NO_HORIZON or self.retention > MAX_OFFSET * 3600 / 4:
            return _NEVER
        return self._horizon + MAX_OFFSET

    # -- merging -------------------------------------------------------------------------------

    def _plan(self) -> None:
        """Start the next merge if none runs: the newest pair of adjacent segments out of ratio,
        else the first segment with a large expired share, alone."""
        if self._merge is not None:
            return
        segments = self._segments
        for k in range(len(segments) - 2, -1, -1):
            if segments[k].size <= RATIO * segments[k + 1].size:
                self._merge = _Merge(segments[k : k + 2], self._horizon, self._ceiling())
                return
        for segment in segments:
            if segment.expired_share(self._horizon) >= PURGE_SHARE:
                self._merge = _Merge([segment], self._horizon, self._ceiling())
                return

    def _work(self, credit: int) -> None:
        """Earn `credit` ids of merge work; run one slice once a slice's worth is earned."""
        if self._merge is None:
            self._credit = 0
            return
        self._credit += credit
        if self._credit >= self.step:
            self._credit -= self.step
            self._merge_step()

    def _merge_step(self) -> None:
        merge = self._merge
        assert merge is not None
        old = merge.views
        finished = merge.step(self.step)
        first = self._segments.index(old[0])
        self._segments[first : first + len(old)] = merge.views
        if finished:
            self._merge = None
            self._plan()

    def settle(self) -> None:
        """Run every merge due now to its end (tests and benchmarks; not on the loop)."""
        while self._merge is not None:
            self._merge_step()

    # -- persistence (outbox journal entries) ---------------------------------------------------

    def entries(self) -> Iterator[dict[str, Any]]:
        """Journal entries that restore this store, one per chunk: a snapshot of it taken now
        (chunks are immutable, the recent ids are copied), to be encoded on another thread."""
        segments = list(self._segments)
        recent = dict(self._recent)

        def generate() -> Iterator[dict[str, Any]]:
            if recent:
                segments.append(_sealed(recent))
            for key, segment in enumerate(segments):
                for part, (hashes, hours, base) in enumerate(segment.chunks):
                    yield {
                        "op": "seen_run",
                        "segment": key,
                        "part": part,
                        "parts": len(segment.chunks),
                        "base": base,
                        "hashes": base64.b64encode(_to_bytes(hashes)).decode("ascii"),
                        "hours": base64.b64encode(_to_bytes(hours)).decode("ascii"),
                    }

        return generate()

    def load_entry(self, entry: dict[str, Any]) -> None:
        """Apply a ``seen_run`` entry, or one an older version wrote: ``seen_hashes`` (a sorted
        segment, kept until its newest id expires) or ``seen`` (id -> time)."""
        op = entry["op"]
        if op == "seen_run":
            self._load_run(entry)
            return
        self._flush_loading()
        if op == "seen_hashes":
            hashes = _from_bytes("q", base64.b64decode(entry["hashes"]))
            if hashes:
                newest = hour_of(float(entry["newest"]))
                hours = array.array("H", bytes(2 * len(hashes)))
                self._segments.append(_Segment([(hashes, hours, newest)], newest))
        else:
            for rid, at in entry["ids"].items():
                self._add(id_hash(rid), hour_of(at))
        self._plan()

    def _load_run(self, entry: dict[str, Any]) -> None:
        hashes = _from_bytes("q", base64.b64decode(entry["hashes"]))
        hours = _from_bytes("H", base64.b64decode(entry["hours"]))
        if len(hashes) != len(hours):
            raise ValueError("seen_run: hashes and hours differ in length")
        if not hashes:
            return
        key, part = entry["segment"], entry["part"]
        loading = self._loading
        # Only the next part of the same segment continues it (after a part quarantined as
        # damaged, a new segment starts: each stays in hash order).
        if (
            loading is None
            or loading[0] != key
            or loading[1] != part
            or hashes[0] <= loading[2][-1][0][-1]
        ):
            self._flush_loading()
            loading = self._loading = [key, part, []]
        loading[1] = part + 1
        loading[2].append((hashes, hours, int(entry["base"])))
        if part + 1 >= entry["parts"]:
            self._flush_loading()

    def _flush_loading(self) -> None:
        loading, self._loading = self._loading, None
        if loading is not None:
            chunks = loading[2]
            self._segments.append(_Segment(chunks, max(map(_chunk_newest, chunks))))
            self._plan()

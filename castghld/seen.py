"""The ids of finished messages (the outbox's dedupe memory), in 8 bytes per id.

Guarantees:
- ``rid in seen`` is true for every id added within ``retention`` seconds (it may stay true up to
  one sealed segment longer). A false positive needs two ids with equal 64-bit hashes: with 1M
  ids stored, about one chance in 10^13 per new id (it would be taken for a duplicate).
- Memory: ids since the last seal sit in a dict (at most ``SEAL_SIZE``); sealed ids are sorted
  64-bit hashes in ``array('q')`` segments, 8 bytes each, untracked by the GC: 1M ids take
  about 8 MB.
- No step holds the loop long: an id's hash is computed when it is added, a seal sorts at most
  ``SEAL_SIZE`` integers (a few ms), a lookup is one bisection per segment, and segments are
  immutable, so a compaction thread can write them while the loop goes on.
- Expiry drops whole segments once their newest id is older than ``retention``.
"""

from __future__ import annotations

import array
import base64
import bisect
import hashlib
import sys
from collections.abc import Iterator
from typing import Any

SEAL_SIZE = 32768


def id_hash(rid: str) -> int:
    digest = hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _to_bytes(hashes: array.array) -> bytes:
    if sys.byteorder == "little":
        return hashes.tobytes()
    swapped = array.array("q", hashes)
    swapped.byteswap()
    return swapped.tobytes()


def _from_bytes(data: bytes) -> array.array:
    hashes = array.array("q")
    hashes.frombytes(data)
    if sys.byteorder != "little":
        hashes.byteswap()
    return hashes


class SeenIds:
    def __init__(self, retention: float):
        self.retention = retention
        self._recent: dict[str, float] = {}
        self._recent_hashes = array.array("q")
        self._recent_oldest = float("inf")
        # (newest time, sorted hashes), oldest segment first.
        self._segments: list[tuple[float, array.array]] = []

    def __contains__(self, rid: str) -> bool:
        if rid in self._recent:
            return True
        if not self._segments:
            return False
        h = id_hash(rid)
        for _, hashes in self._segments:
            i = bisect.bisect_left(hashes, h)
            if i < len(hashes) and hashes[i] == h:
                return True
        return False

    def __len__(self) -> int:
        return len(self._recent) + sum(len(hashes) for _, hashes in self._segments)

    def add(self, rid: str, at: float) -> None:
        if rid in self._recent:
            return
        self._recent[rid] = at
        self._recent_hashes.append(id_hash(rid))
        self._recent_oldest = min(self._recent_oldest, at)
        if len(self._recent) >= SEAL_SIZE:
            self.seal()

    def seal(self) -> None:
        """Turn the recent ids into a sorted segment."""
        if not self._recent:
            return
        newest = max(self._recent.values())
        self._segments.append((newest, array.array("q", sorted(self._recent_hashes))))
        self._segments.sort(key=lambda segment: segment[0])
        self._recent = {}
        self._recent_hashes = array.array("q")
        self._recent_oldest = float("inf")

    def prune(self, now: float) -> None:
        """Forget segments whose newest id is older than `retention` (recent ids that old are
        sealed first, so they go with their segment)."""
        horizon = now - self.retention
        if self._recent_oldest < horizon:
            self.seal()
        if self._segments and self._segments[0][0] < horizon:
            self._segments = [s for s in self._segments if s[0] >= horizon]

    # -- persistence (outbox journal entries) ---------------------------------------------------

    def entries(self) -> Iterator[dict[str, Any]]:
        """Journal entries that restore this store; a snapshot of it taken now (segments are
        immutable, the recent ids are copied), to be encoded on another thread."""
        segments = list(self._segments)
        recent = dict(self._recent)

        def generate() -> Iterator[dict[str, Any]]:
            for newest, hashes in segments:
                encoded = base64.b64encode(_to_bytes(hashes)).decode("ascii")
                yield {"op": "seen_hashes", "newest": newest, "hashes": encoded}
            if recent:
                yield {"op": "seen", "ids": recent}

        return generate()

    def load_entry(self, entry: dict[str, Any]) -> None:
        """Apply a ``seen`` (id -> time) or ``seen_hashes`` entry from the journal."""
        if entry["op"] == "seen_hashes":
            hashes = _from_bytes(base64.b64decode(entry["hashes"]))
            self._segments.append((float(entry["newest"]), hashes))
            self._segments.sort(key=lambda segment: segment[0])
        else:
            for rid, at in entry["ids"].items():
                self.add(rid, at)

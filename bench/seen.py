"""The dedupe store (castghld/seen.py) at 100k and 1M ids: lookup cost, longest step, memory.

Run: .venv/bin/python bench/seen.py [counts...]   (default: 100000 1000000)
To measure another revision's store: PYTHONPATH=<its checkout> python bench/seen.py
Not part of the test suite.

Per count N (30-day window, ids added at N per window, as `Outbox.finish` adds them, with a
`prune` every 8,192 adds as compactions call it):
- fill: N ids over one window; then steady: N/2 more over half a window (the oldest expire);
- step max: the longest single `add` or `prune` call (a seal, a merge slice), in ms: what the
  IOLoop is held for at most (on a shared machine, preemption adds to it: the count of calls
  over 5 ms tells a one-off from a pattern);
- lookup: ns per `in` for ids in the store (hit) and never added (miss, every new webhook);
- segments, ids held (stale ones included) against ids inside the window, and the store's
  memory (tracemalloc: everything it allocated and still holds; peak while filling).
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
import tracemalloc

from castghld import seen as seen_module

RETENTION = 30 * 86400.0
PRUNE_EVERY = 8192
LOOKUPS = 100_000


def rid(n: int) -> str:
    return f"msg{n:021d}"  # GHL message ids are ~20-24 characters


def segments(store) -> int:
    return len(store._segments)


def run(count: int, traced: bool) -> dict[str, float]:
    """Fill and run to steady state; with `traced`, only the memory figures are meaningful
    (tracemalloc slows every allocation down), without, only the times."""
    gc.collect()
    if traced:
        tracemalloc.start()
    store = seen_module.SeenIds(RETENTION)
    start = 1_700_000_000.0
    per_id = RETENTION / count
    worst = 0.0
    slow = 0
    total = count + count // 2
    clock = time.perf_counter
    for n in range(total):
        at = start + n * per_id
        before = clock()
        store.add(rid(n), at)
        if n % PRUNE_EVERY == PRUNE_EVERY - 1:
            store.prune(at)
        took = clock() - before
        worst = max(worst, took)
        slow += took > 0.005
        if n == count - 1:
            filled = store_size(store)
    now = start + total * per_id
    store.prune(now)
    gc.collect()
    if traced:
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"memory MB": held / 1e6, "peak MB": peak / 1e6}
    first_live = total - count  # ids added within the last window
    hits = random.Random(1).sample(range(first_live, total), LOOKUPS)
    hit_ids = [rid(n) for n in hits]
    miss_ids = [f"new{n:021d}" for n in range(LOOKUPS)]
    assert all(i in store for i in hit_ids[:1000])
    before = clock()
    for i in hit_ids:
        i in store  # noqa: B015
    hit_ns = (clock() - before) / LOOKUPS * 1e9
    before = clock()
    missed = sum(i in store for i in miss_ids)
    miss_ns = (clock() - before) / LOOKUPS * 1e9
    assert missed == 0
    return {
        "ids": count,
        "step max ms": worst * 1e3,
        "steps over 5 ms": slow,
        "lookup hit ns": hit_ns,
        "lookup miss ns": miss_ns,
        "segments": segments(store),
        "held ids": len(store),
        "segments after fill": filled,
    }


def store_size(store) -> int:
    return segments(store)


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [100_000, 1_000_000]
    print(f"castghld.seen from {seen_module.__file__}, load average {os.getloadavg()[0]:.2f}")
    for count in counts:
        r = run(count, traced=False) | run(count, traced=True)
        print(
            f"{r['ids']:>9,} ids in the window: step max {r['step max ms']:.1f} ms "
            f"({r['steps over 5 ms']} over 5 ms), "
            f"lookup {r['lookup hit ns']:,.0f} ns hit / {r['lookup miss ns']:,.0f} ns miss, "
            f"{r['segments after fill']} segments after the fill, {r['segments']} in steady "
            f"state, {r['held ids']:,} ids held, {r['memory MB']:.1f} MB (peak "
            f"{r['peak MB']:.1f} MB)"
        )


if __name__ == "__main__":
    main()

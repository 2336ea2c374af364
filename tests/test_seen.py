"""The dedupe store (castghld/seen.py): merges keep every id of the window, stay few, restore."""

from __future__ import annotations

import array
import asyncio
import base64
import json
import math
import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castghld import seen as seen_module
from castghld.seen import SEAL_SIZE, SeenIds, hour_of, id_hash
from tests.test_outbox import keyring, make_outbox

RETENTION = 10 * 3600.0
START = 1_700_000_000.0

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 60)),
        # A `done` entry stamped while the clock was off: years ahead, or up to two windows back.
        st.tuples(st.just("add_ahead"), st.integers(0, 60)),
        st.tuples(st.just("add_behind"), st.integers(0, 60)),
        st.tuples(st.just("advance"), st.integers(0, 4 * 3600)),
        # To just before, at or after an edge of the window (an hour is the store's unit).
        st.tuples(st.just("advance"), st.sampled_from([1, 3599, 3600, 3601, RETENTION - 1])),
        st.tuples(
            st.just("advance"), st.sampled_from([RETENTION, RETENTION + 1, RETENTION + 3600])
        ),
        st.tuples(st.just("prune"), st.just(0)),
        # A prune when the last id added is about to leave the window, or just left it.
        st.tuples(st.just("prune_edge"), st.sampled_from([-3600, -1, 0, 1, 3599])),
        st.tuples(st.just("seal"), st.just(0)),
        st.tuples(st.just("step"), st.integers(1, 8)),
        st.tuples(st.just("settle"), st.just(0)),
        st.tuples(st.just("snapshot"), st.just(0)),
        st.tuples(st.just("restore"), st.just(0)),
        st.tuples(st.just("reload"), st.integers(0, 1)),
    ),
    max_size=150,
)


def reloaded(entries, seal_size: int = 3, step: int = 2) -> SeenIds:
    """A store read back from `entries` after a trip through JSON, as the journal does it."""
    store = SeenIds(RETENTION, seal_size=seal_size, step=step)
    for entry in entries:
        store.load_entry(json.loads(json.dumps(entry)))
    return store


def rid(n: int) -> str:
    return f"msg-{n}"


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(OPS)
def test_membership_equals_a_set_within_the_window_whatever_merges_expiry_and_reloads_do(ops):
    # Tiny seals, slices and chunks so that a few dozen ids go through every merge path.
    with mock.patch.object(seen_module, "CHUNK", 4), mock.patch.object(seen_module, "SAMPLE", 4):
        store = SeenIds(RETENTION, seal_size=3, step=2)
        added: dict[str, float] = {}  # the model: id -> latest time added
        log: list[tuple[str, float]] = []  # every add, as the journal's `done` entries
        now = START
        pruned = None  # the time of the last prune: ids added since its window must be held
        snapshot = None  # (entries not read yet, how many adds the journal had then)

        def window(since: float | None) -> list[str]:
            return [i for i, at in added.items() if since is None or at >= since - RETENTION]

        for op, arg in ops:
            if op.startswith("add"):
                at = {"add": now, "add_ahead": now + 10 * 365 * 86400.0}.get(
                    op, now - 2 * arg * 600
                )
                store.add(rid(arg), at)
                added[rid(arg)] = max(at, added.get(rid(arg), at))
                log.append((rid(arg), at))
            elif op == "advance":
                now += arg
            elif op in ("prune", "prune_edge"):
                if op == "prune_edge" and log and log[-1][1] <= now:
                    now = max(now, log[-1][1] + RETENTION + arg)
                store.prune(now)
                pruned = now
            elif op == "seal":
                store.seal()
            elif op == "step":
                for _ in range(arg):
                    store._work(store.step)
            elif op == "settle":
                store.settle()
            elif op == "snapshot":
                snapshot = (store.entries(), len(log))
            elif op == "restore" and snapshot is not None:
                # A compaction: the snapshot, encoded after the merges that ran since it was
                # taken (as on the compaction thread), then the `done` entries appended since,
                # replayed and pruned as `Outbox.load` does: every id of the window is held.
                entries, written = snapshot
                restored = reloaded(entries)
                for i, at in log[written:]:
                    restored.add(i, at)
                restored.prune(now)
                assert all(i in restored for i in window(now))
                snapshot = None
            elif op == "reload":
                store = reloaded(store.entries())
                if arg % 2:  # as `Outbox.load` ends
                    store.prune(now)
                    pruned = now
            assert all(i in store for i in window(pruned)), op
            assert not any(f"never-{n}" in store for n in range(5))
        store.settle()
        assert all(i in store for i in window(pruned))


def test_segments_stay_logarithmic_in_the_ids_held():
    store = SeenIds(30 * 86400.0)
    worst = 0.0
    for n in range(60 * SEAL_SIZE):
        store.add(rid(n), START + n)
        if n % SEAL_SIZE == 0 and n:
            worst = max(worst, store.segments - math.log2(len(store) / SEAL_SIZE))
    # At most log2(N / seal) + 1 in ratio, plus the seals that arrive while one merge runs.
    assert worst <= 3
    assert store.segments <= math.log2(len(store) / SEAL_SIZE) + 3
    assert all(rid(n) in store for n in range(0, 60 * SEAL_SIZE, 37))


def test_a_merge_step_handles_at_most_a_slice():
    store = SeenIds(30 * 86400.0)
    for n in range(40 * SEAL_SIZE):
        store.add(rid(n), START)
    store.settle()
    big = store._segments[0]
    merge = seen_module._Merge([big, big], seen_module._NO_HORIZON)
    sizes = []
    while True:
        before = sum(len(c[0]) for c in merge.done)
        finished = merge.step(store.step)
        sizes.append(sum(len(c[0]) for c in merge.done) - before)
        if finished:
            break
    # The same ids twice: each step reads at most one slice and keeps each id once.
    assert max(sizes) <= store.step
    assert sum(sizes) == big.size


def test_expired_ids_are_dropped_by_merges_and_whole_segments_by_prune():
    store = SeenIds(RETENTION, seal_size=100)
    for n in range(1000):
        store.add(rid(n), START + n * 60)  # 1000 minutes
    now = START + 1000 * 60
    store.prune(now)
    store.settle()
    assert all(rid(n) in store for n in range(1000) if START + n * 60 >= now - RETENTION)
    window = sum(START + n * 60 >= now - RETENTION for n in range(1000))
    # An id may stay until its hour ends and a merge or prune reaches it: not a second window.
    assert len(store) <= window + 200
    store.prune(now + RETENTION + 3600)
    store.settle()
    assert len(store) == 0


def test_a_damaged_part_does_not_cost_the_other_parts_their_order():
    with mock.patch.object(seen_module, "CHUNK", 64):
        store = SeenIds(RETENTION, seal_size=64, step=32)
        for n in range(2000):
            store.add(rid(n), START)
        store.settle()
        entries = list(store.entries())
    assert len(entries) > 10
    damaged = entries.pop(3)  # a journal line quarantined as unreadable
    gone = set(array.array("q", base64.b64decode(damaged["hashes"])))
    again = reloaded(entries, seal_size=64, step=32)
    assert all((rid(n) in again) == (id_hash(rid(n)) not in gone) for n in range(2000))


def test_entries_of_an_older_version_still_load():
    now = time.time()
    old = sorted(id_hash(rid(n)) for n in range(100))
    entries = [
        {
            "op": "seen_hashes",
            "newest": now,
            "hashes": base64.b64encode(array.array("q", old).tobytes()).decode(),
        },
        {"op": "seen", "ids": {rid(n): now for n in range(100, 110)}},
    ]
    store = reloaded(entries)
    assert all(rid(n) in store for n in range(110))
    store.prune(now + RETENTION - 3600)
    assert rid(0) in store  # kept until its segment's newest id expires, as before
    store.prune(now + RETENTION + 3600)
    store.settle()
    assert rid(0) not in store and rid(105) not in store


def test_hours_round_up():
    assert hour_of(3600.0) == 1 and hour_of(3600.5) == 2


@pytest.mark.gen_test(timeout=60)
async def test_a_compaction_during_a_merge_keeps_every_id_across_a_restart(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    count = 0

    def merging() -> int:
        merge = outbox.seen._merge
        return 0 if merge is None or len(merge.views) < 2 else sum(s.size for s in merge.views)

    # Until a merge of several seals' worth is half done when the snapshot is taken.
    while count < 12 * SEAL_SIZE or merging() < 4 * SEAL_SIZE:
        outbox.seen.add(f"out:{count}", time.time())
        count += 1
    compaction = asyncio.ensure_future(outbox.compact())
    await asyncio.sleep(0)  # the snapshot is taken; the compaction thread encodes it
    for n in range(count, count + 2 * SEAL_SIZE):
        outbox.seen.add(f"out:{n}", time.time())  # merge slices run meanwhile
    await compaction
    await outbox.stop()
    again = make_outbox(tmp_path, keys)
    assert all(again.known(f"out:{n}") for n in range(0, count, 7))
    assert not again.known("out:new")


def test_an_id_finished_while_the_clock_ran_years_ahead_does_not_pin_the_window():
    # A `done` entry written while the clock was 10 years ahead (then NTP set it back): merges
    # must not raise every id they merge with it to its hour minus 16 bits (7.5 years), or
    # nothing merged with it ever expires and the store grows without bound.
    retention = 30 * 86400.0
    store = SeenIds(retention, seal_size=256, step=128)
    store.add("clock-ahead", START + 10 * 365 * 86400)
    count = 40_000
    for n in range(count):  # 120 days of traffic
        at = START + n * (120 * 86400 / count)
        store.add(rid(n), at)
        if n % 1000 == 0:
            store.prune(at)
    now = START + 120 * 86400
    store.prune(now)
    store.settle()
    store.prune(now)
    store.settle()
    window = sum(START + n * (120 * 86400 / count) >= now - retention for n in range(count))
    assert all(rid(n) in store for n in range(count - window, count))
    assert "clock-ahead" in store  # kept longer than the window, never forgotten early
    assert len(store) <= window + window // 4


@pytest.mark.gen_test(timeout=60)
async def test_a_restart_after_a_done_entry_from_a_clock_years_ahead_keeps_expiring_ids(tmp_path):
    # The journal's `done` entries are replayed before `load` knows the window: merges run by
    # that replay must not raise every id to within 16 bits of the one stamped 10 years ahead
    # (then none of them would expire for years after the restart).
    keys = keyring()
    outbox = make_outbox(tmp_path, keys, retention=30 * 86400.0)
    await outbox.start()
    now = time.time()
    count = 12 * SEAL_SIZE
    entries = [  # finished 40 to 60 days ago: out of the window
        {"op": "done", "id": f"old:{n}", "at": now - 86400 * (40 + n % 20)} for n in range(count)
    ]
    entries.append({"op": "done", "id": "ahead", "at": now + 10 * 365 * 86400})
    entries += [{"op": "done", "id": f"new:{n}", "at": now} for n in range(SEAL_SIZE)]
    await asyncio.gather(*map(outbox.journal.append, entries))  # one fsync per batch
    await outbox.stop()
    again = make_outbox(tmp_path, keys, retention=30 * 86400.0)
    again.seen.settle()
    again.seen.prune(time.time())
    again.seen.settle()
    assert again.known("ahead") and all(again.known(f"new:{n}") for n in range(0, SEAL_SIZE, 7))
    assert len(again.seen) <= SEAL_SIZE + SEAL_SIZE // 4

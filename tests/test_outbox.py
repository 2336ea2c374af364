"""The outbox journal on its own: durability, encryption, group commit, recovery, compaction."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import stat
import threading
import time
import weakref

import pytest

from castghld.fakes import wait_for
from castghld.journal import JOURNAL_FILENAME, QUARANTINE_FILENAME
from castghld.metrics import Metrics
from castghld.outbox import Outbox
from castghld.seen import SEAL_SIZE, SeenIds
from castghld.state import KeyRing, StateError, new_key_line


def keyring(line: str | None = None) -> KeyRing:
    import base64

    return KeyRing([base64.urlsafe_b64decode((line or new_key_line()).strip())])


class Recorder:
    """A pipeline that remembers what it was given and finishes each record."""

    def __init__(self, finish: bool = True):
        self.seen: list[str] = []
        self.finish = finish

    async def __call__(self, outbox: Outbox, rid: str) -> None:
        self.seen.append(rid)
        if self.finish:
            await outbox.finish(rid)


def make_outbox(directory, keys: KeyRing, pipeline=None, retention=86400.0) -> Outbox:
    outbox = Outbox(str(directory), keys, Metrics(), retention)
    outbox.pipelines["outbound"] = pipeline or Recorder(finish=False)
    outbox.load()
    return outbox


def record(n: int = 0) -> dict:
    return {"kind": "outbound", "phone": "+639171234567", "message": f"secret text {n}"}


@pytest.mark.gen_test(timeout=10)
async def test_replayed_records_share_one_string_per_key(tmp_path):
    # json.loads makes new key strings for every object: 100k replayed records kept ~50 MB of
    # copies of the same few keys alive.
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    for n in range(3):
        await outbox.add(f"out:{n}", {**record(n), "attachments": ["https://ex.am/a"]})
        await outbox.update(f"out:{n}", stage="sent", cast_id=f"c{n}")
    await outbox.stop()
    again = make_outbox(tmp_path, keys)
    first, *others = (again.records[f"out:{n}"] for n in range(3))
    assert first["stage"] == "sent" and first["attachments"] == ("https://ex.am/a",)
    for other in others:
        assert list(other) == list(first)
        assert all(a is b for a, b in zip(other, first, strict=True))  # the same key objects
        assert other["stage"] is first["stage"] and other["kind"] is first["kind"]


@pytest.mark.gen_test(timeout=10)
async def test_added_records_survive_a_restart_encrypted_and_private(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    assert await outbox.add("out:1", record(1)) is True
    await outbox.update("out:1", stage="sent")
    await outbox.stop()
    path = tmp_path / JOURNAL_FILENAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = path.read_bytes()
    assert b"secret text" not in data
    assert b"+639171234567" not in data
    again = make_outbox(tmp_path, keys)
    assert again.records == {"out:1": {**record(1), "stage": "sent"}}


@pytest.mark.gen_test(timeout=10)
async def test_unfinished_records_are_dispatched_again_on_start(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    await outbox.add("out:1", record(1))
    await outbox.stop()
    recorder = Recorder()
    again = make_outbox(tmp_path, keys, recorder)
    await again.start()
    await again.wait_idle()
    assert recorder.seen == ["out:1"]
    assert again.records == {}
    assert again.known("out:1")
    await again.stop()


@pytest.mark.gen_test(timeout=10)
async def test_finished_ids_stay_known_across_restarts_until_retention(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys, Recorder())
    await outbox.start()
    await outbox.add("out:1", record())
    await outbox.wait_idle()
    await outbox.stop()
    again = make_outbox(tmp_path, keys, Recorder())
    assert again.known("out:1")
    assert await again.add("out:1", record()) is False
    expired = make_outbox(tmp_path, keys, Recorder(), retention=0.0)
    expired.seen.prune(time.time() + 3600)  # ids are kept with their hour, rounded up
    assert not expired.known("out:1")


@pytest.mark.gen_test(timeout=10)
async def test_concurrent_adds_share_fsyncs(tmp_path):
    outbox = make_outbox(tmp_path, keyring())
    await outbox.start()
    before = outbox.journal.fsyncs
    results = await asyncio.gather(*(outbox.add(f"out:{n}", record(n)) for n in range(200)))
    assert all(results)
    fsyncs = outbox.journal.fsyncs - before
    assert fsyncs < 50, f"{fsyncs} fsyncs for 200 records"
    await outbox.stop()


@pytest.mark.gen_test(timeout=10)
async def test_same_id_while_first_is_being_written_is_a_duplicate(tmp_path):
    outbox = make_outbox(tmp_path, keyring())
    await outbox.start()
    first, second = await asyncio.gather(
        outbox.add("out:1", record()), outbox.add("out:1", record())
    )
    assert (first, second) == (True, False)
    await outbox.stop()


@pytest.mark.gen_test(timeout=10)
async def test_torn_last_line_is_dropped_and_cut_away(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    await outbox.add("out:1", record(1))
    await outbox.add("out:2", record(2))
    await outbox.stop()
    path = tmp_path / JOURNAL_FILENAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # a crash in the middle of the last write
    again = make_outbox(tmp_path, keys)
    assert list(again.records) == ["out:1"]
    await again.start()
    await again.add("out:3", record(3))
    await again.stop()
    assert list(make_outbox(tmp_path, keys).records) == ["out:1", "out:3"]


@pytest.mark.gen_test(timeout=10)
async def test_damage_before_the_last_line_is_quarantined_and_the_rest_loads(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    for n in range(3):
        await outbox.add(f"out:{n}", record(n))
    await outbox.stop()
    path = tmp_path / JOURNAL_FILENAME
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:10] + (b"A" if lines[1][10:11] != b"A" else b"B") + lines[1][11:]
    path.write_bytes(b"\n".join(lines))
    again = make_outbox(tmp_path, keys)
    assert list(again.records) == ["out:0", "out:2"]
    assert again.journal.unreadable == [2]
    await again.start()
    await again.stop()
    quarantine = tmp_path / QUARANTINE_FILENAME
    assert quarantine.read_bytes() == lines[1] + b"\n"
    assert stat.S_IMODE(os.stat(quarantine).st_mode) == 0o600
    after = make_outbox(tmp_path, keys)
    assert list(after.records) == ["out:0", "out:2"]
    assert after.journal.unreadable == []


@pytest.mark.gen_test(timeout=10)
async def test_wrong_key_is_a_startup_error(tmp_path):
    outbox = make_outbox(tmp_path, keyring())
    await outbox.start()
    await outbox.add("out:1", record())
    await outbox.add("out:2", record())
    await outbox.stop()
    with pytest.raises(StateError, match="not in"):
        make_outbox(tmp_path, keyring())


@pytest.mark.gen_test(timeout=10)
async def test_failed_write_is_refused_and_leaves_no_partial_entry(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    await outbox.add("out:1", record(1))
    size = os.path.getsize(tmp_path / JOURNAL_FILENAME)
    os.close(outbox.journal._fd)
    # The journal's descriptor now points at a device that is always full.
    outbox.journal._fd = os.open("/dev/full", os.O_WRONLY)
    with pytest.raises(OSError):
        await outbox.add("out:2", record(2))
    assert "out:2" not in outbox.records
    assert not outbox.known("out:2")
    await outbox.stop()
    assert os.path.getsize(tmp_path / JOURNAL_FILENAME) == size
    assert list(make_outbox(tmp_path, keys).records) == ["out:1"]


@pytest.mark.gen_test(timeout=20)
async def test_compaction_keeps_live_records_and_seen_ids(tmp_path, monkeypatch):
    import castghld.outbox_compaction as module

    monkeypatch.setattr(module, "COMPACT_MIN_ENTRIES", 50)
    keys = keyring()
    outbox = make_outbox(tmp_path, keys, Recorder())
    await outbox.start()
    for n in range(100):
        await outbox.add(f"out:{n}", record(n))
    await outbox.wait_idle()
    outbox.pipelines["outbound"] = Recorder(finish=False)
    await outbox.add("out:live", record())
    path = tmp_path / JOURNAL_FILENAME
    await wait_for(lambda: len(path.read_bytes().splitlines()) < 110)
    await outbox.stop()
    assert len(path.read_bytes().splitlines()) < 110  # 201 entries before compaction
    again = make_outbox(tmp_path, keys)
    assert list(again.records) == ["out:live"]
    assert all(again.known(f"out:{n}") for n in range(100))


@pytest.mark.gen_test(timeout=20)
async def test_compaction_during_writes_loses_nothing(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    first = [asyncio.ensure_future(outbox.add(f"out:{n}", record(n))) for n in range(100)]
    await asyncio.sleep(0)  # the writer is now busy with the first batch
    compaction = asyncio.ensure_future(outbox.compact())
    await asyncio.sleep(0)
    second = [asyncio.ensure_future(outbox.add(f"out:{n}", record(n))) for n in range(100, 200)]
    assert all(await asyncio.gather(*first, *second))
    await compaction
    await outbox.stop()
    assert len(make_outbox(tmp_path, keys).records) == 200


@pytest.mark.gen_test(timeout=10)
async def test_id_is_not_known_until_its_write_is_durable(tmp_path):
    outbox = make_outbox(tmp_path, keyring())
    await outbox.start()
    adding = asyncio.ensure_future(outbox.add("out:1", record()))
    await asyncio.sleep(0)
    assert "out:1" in outbox.records and not outbox.known("out:1")
    assert await adding is True
    assert outbox.known("out:1")
    await outbox.stop()


def test_seen_ids_are_kept_for_the_retention_then_dropped():
    seen = SeenIds(retention=3600.0)
    now = time.time()
    for n in range(SEAL_SIZE + 10):  # one sealed segment and a few recent ids
        seen.add(f"old-{n}", now - 3 * 3600)  # (ids are kept with their hour, rounded up)
    seen.add("new", now)
    assert "old-0" in seen and f"old-{SEAL_SIZE + 5}" in seen and "new" in seen
    assert "never" not in seen
    seen.prune(now)
    assert "old-0" not in seen  # its segment expired as a whole
    assert "new" in seen


def test_seen_ids_take_at_most_16_bytes_each():
    seen = SeenIds(retention=86400.0)
    count = 6 * SEAL_SIZE
    for n in range(count):
        seen.add(f"msg-{n:08d}", 1.0)
    seen.seal()
    assert len(seen) == count
    assert seen.nbytes() <= 10 * count  # a 64-bit hash and a 16-bit hour each
    assert all(f"msg-{n:08d}" in seen for n in range(0, count, 997))
    assert sum(f"other-{n}" in seen for n in range(10_000)) == 0


@pytest.mark.gen_test(timeout=20)
async def test_seen_ids_survive_compaction_and_restart_compactly(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    count = SEAL_SIZE + 1000
    for n in range(count):
        outbox.seen.add(f"out:{n}", time.time())
    await outbox.compact()
    await outbox.stop()
    # 10 bytes each (a 64-bit hash, a 16-bit hour for expiry in merges), base64 twice: 17.8.
    assert os.path.getsize(tmp_path / JOURNAL_FILENAME) < 18 * count
    again = make_outbox(tmp_path, keys)
    assert all(again.known(f"out:{n}") for n in range(0, count, 101))
    assert again.known(f"out:{count - 1}")
    assert not again.known("out:new")


@pytest.mark.gen_test(timeout=30)
async def test_compaction_does_not_hold_the_loop(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    for start in range(0, 20_000, 1000):
        await asyncio.gather(
            *(outbox.add(f"out:{n}", record(n)) for n in range(start, start + 1000))
        )
    worst = 0.0

    async def watch() -> None:
        nonlocal worst
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.002)
            worst = max(worst, time.perf_counter() - before - 0.002)

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0.01)
    await outbox.compact()
    watcher.cancel()
    await outbox.stop()
    # Encoding 20k records on the loop took about half a second; off the loop the loop only
    # waits for the GIL now and then.
    assert worst < 0.1
    assert len(make_outbox(tmp_path, keys).records) == 20_000


@pytest.mark.gen_test(timeout=10)
async def test_writer_thread_runs_calls_in_order_and_hands_back_errors():
    from castghld.journal import _WriterThread

    writer = _WriterThread("test-writer")
    done: list[int] = []

    def step(n: int) -> int:
        time.sleep(0.01)
        done.append(n)
        return n * 10

    def fail() -> None:
        raise OSError(28, "No space left on device")

    first = writer.call(step, 1)
    abandoned = writer.call(step, 2)
    failing = writer.call(fail)
    last = writer.call(step, 3)
    abandoned.cancel()  # its awaiter went away: the write is still done, in order
    assert await first == 10
    with pytest.raises(OSError) as e:
        await failing
    assert e.value.errno == 28
    assert await last == 30
    assert done == [1, 2, 3]
    queued = writer.call(step, 4)
    writer.shutdown()  # lets the queued call finish before the thread ends
    assert done == [1, 2, 3, 4]
    assert await queued == 40


def _brute_force(outbox: Outbox) -> dict:
    """What the per-kind index must say, computed from the records themselves."""
    out = {}
    for kind in ("outbound", "inbound"):
        rids = [rid for rid, r in outbox.records.items() if r.get("kind") == kind]
        out[kind] = (len(rids), rids[0] if rids else None)
    return out


def _indexed(outbox: Outbox) -> dict:
    outbox.update_metrics()
    out = {}
    for kind in ("outbound", "inbound"):
        oldest = outbox.oldest(kind)
        first = next((rid for rid, r in outbox.records.items() if r is oldest), None)
        out[kind] = (int(outbox.metrics.outbox_pending.labels(kind)._value.get()), first)
    return out


@pytest.mark.gen_test(timeout=20)
async def test_pending_counts_and_oldest_follow_adds_finishes_drops_and_restarts(tmp_path):
    """/metrics reads the backlog from a per-kind index (no pass over 100k records per scrape):
    it must agree with the records after every kind of change, and after a replay."""
    import random

    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    outbox.pipelines["inbound"] = Recorder(finish=False)
    await outbox.start()
    rng = random.Random(7)
    live: list[str] = []
    for n in range(300):
        action = rng.random()
        if action < 0.55 or not live:
            rid = f"r{n}"
            kind = "inbound" if rng.random() < 0.3 else "outbound"
            assert await outbox.add(rid, {**record(n), "kind": kind, "accepted_at": n})
            live.append(rid)
        elif action < 0.8:
            await outbox.finish(live.pop(rng.randrange(len(live))))
        elif action < 0.9:
            assert await outbox.drop(live.pop(rng.randrange(len(live))))
        else:
            await outbox.update(rng.choice(live), stage="sent")
        assert _indexed(outbox) == _brute_force(outbox)
    assert await outbox.add(live[0], record(0)) is False  # a duplicate changes nothing
    assert _indexed(outbox) == _brute_force(outbox)
    await outbox.stop()
    again = make_outbox(tmp_path, keys)
    again.pipelines["inbound"] = Recorder(finish=False)
    assert sorted(again.records) == sorted(live)
    assert _indexed(again) == _brute_force(again)


@pytest.mark.gen_test(timeout=10)
async def test_a_record_that_could_not_be_stored_leaves_the_counts(tmp_path):
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    os.chmod(tmp_path, 0o500)  # no new files; the journal's fd still writes: fail it instead
    outbox.journal._fd, fd = os.open(os.devnull, os.O_RDONLY), outbox.journal._fd
    try:
        with pytest.raises(OSError):
            await outbox.add("out:1", record(1))
    finally:
        os.close(outbox.journal._fd)
        outbox.journal._fd = fd
        os.chmod(tmp_path, 0o700)
    assert (
        _indexed(outbox)
        == _brute_force(outbox)
        == {
            "outbound": (0, None),
            "inbound": (0, None),
        }
    )
    await outbox.stop()


@pytest.mark.gen_test(timeout=10)
async def test_a_writer_thread_that_cannot_start_refuses_the_write_and_the_next_one_starts_it(
    tmp_path,
):
    """No thread can start when the unit is at its TasksMax or memory is short: the write is
    refused (OSError: the webhook gets 503 and GHL retries), never left waiting, and a later
    write starts the thread."""
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    threading.stack_size(2**50)  # more than the address space: "can't start new thread"
    try:
        with pytest.raises(OSError) as refused:
            await asyncio.wait_for(outbox.add("out:1", record(1)), 5)
        assert refused.value.errno == errno.EAGAIN  # not the TimeoutError of a write left waiting
    finally:
        threading.stack_size(0)
    assert not outbox.known("out:1")
    assert await outbox.add("out:1", record(1)) is True
    await asyncio.wait_for(outbox.stop(), 5)
    assert make_outbox(tmp_path, keys).records == {"out:1": record(1)}


@pytest.mark.gen_test(timeout=10)
async def test_a_journal_dropped_unclosed_lets_its_writer_thread_end(tmp_path):
    """Tests build many outboxes and do not stop them all: each writer thread ends with its
    journal instead of waiting forever for a job."""
    keys = keyring()

    def writers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "castghld-outbox"}

    before = writers()
    outboxes = []  # held until counted: one dropped earlier may end its thread before the count
    for n in range(3):
        (tmp_path / str(n)).mkdir()
        outbox = make_outbox(tmp_path / str(n), keys)
        await outbox.start()
        assert await outbox.add(f"out:{n}", record(n)) is True
        await outbox.wait_idle()
        outboxes.append(outbox)
    assert len(writers() - before) == 3
    journals = [weakref.ref(outbox.journal) for outbox in outboxes]
    del outbox, outboxes
    gc.collect()
    assert all(journal() is None for journal in journals)
    await wait_for(lambda: not writers() - before)

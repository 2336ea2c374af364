"""Encrypted state file: round trip, rotation, refusal to touch what it cannot read, crashes."""

from __future__ import annotations

import asyncio
import os
import pathlib
import stat
import subprocess
import sys
import textwrap

import pytest

from castghld.state import (
    STATE_FILENAME,
    KeyRing,
    StateError,
    StateStore,
    atomic_write,
    create_private_file,
    new_key_line,
)


def write_key_file(path, *lines: str) -> str:
    create_private_file(str(path), ("\n".join(lines) + "\n").encode())
    return str(path)


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return str(d)


def open_store(state_dir, key_file) -> StateStore:
    store = StateStore(state_dir, KeyRing.load(key_file))
    store.load()
    return store


def save(store: StateStore) -> None:
    asyncio.run(store.commit())


def test_round_trip(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    store.put("installs", "LOC1", {"access_token": "at-1", "expires_at": 1.5})
    save(store)
    store.close()
    again = open_store(state_dir, key)
    assert again.get("installs", "LOC1") == {"access_token": "at-1", "expires_at": 1.5}
    again.close()


def test_file_is_encrypted_and_private(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    store.put("installs", "LOC1", {"access_token": "very-secret-token"})
    save(store)
    store.close()
    path = os.path.join(state_dir, STATE_FILENAME)
    assert b"very-secret-token" not in pathlib.Path(path).read_bytes()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(state_dir) == [STATE_FILENAME]  # no temporary file left behind


def test_key_rotation_reencrypts_with_newest(state_dir, tmp_path):
    old = new_key_line()
    store = open_store(state_dir, write_key_file(tmp_path / "k1", old))
    store.put("installs", "LOC1", {"v": 1})
    save(store)
    store.close()
    new = new_key_line()
    rotated = write_key_file(tmp_path / "k2", new, old)
    store = open_store(state_dir, rotated)
    assert store.get("installs", "LOC1") == {"v": 1}
    assert store.dirty  # loading with an older key schedules a re-encryption
    save(store)
    store.close()
    # Now the newest key alone is enough.
    only_new = write_key_file(tmp_path / "k3", new)
    assert open_store(state_dir, only_new).get("installs", "LOC1") == {"v": 1}


def test_wrong_key_is_a_clear_error_and_file_untouched(state_dir, tmp_path):
    store = open_store(state_dir, write_key_file(tmp_path / "k1", new_key_line()))
    store.put("installs", "LOC1", {"v": 1})
    save(store)
    store.close()
    path = os.path.join(state_dir, STATE_FILENAME)
    before = pathlib.Path(path).read_bytes()
    other = StateStore(state_dir, KeyRing.load(write_key_file(tmp_path / "k2", new_key_line())))
    with pytest.raises(StateError) as info:
        other.load()
    assert str(info.value).startswith(path + ": encrypted with key ")
    assert "is not in" in str(info.value)
    other.put("installs", "LOC2", {"v": 2})
    with pytest.raises(StateError, match="refusing to overwrite"):
        asyncio.run(other.commit())
    assert pathlib.Path(path).read_bytes() == before


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_tampered_or_truncated_file_is_refused(state_dir, tmp_path, damage):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    store.put("installs", "LOC1", {"v": 1})
    save(store)
    store.close()
    path = os.path.join(state_dir, STATE_FILENAME)
    blob = bytearray(pathlib.Path(path).read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) - 10]
    else:
        blob[-20] ^= 0x01
    pathlib.Path(path).write_bytes(blob)
    with pytest.raises(StateError) as info:
        open_store(state_dir, key)
    assert str(info.value) == f"{path}: authentication failed: the file is truncated or was altered"


def test_missing_key_file(tmp_path):
    with pytest.raises(StateError) as info:
        KeyRing.load(str(tmp_path / "absent.key"))
    path = str(tmp_path / "absent.key")
    assert str(info.value) == (
        f"state.key_file {path}: does not exist; create it: castghld gen-key {path}"
    )


def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "k"
    path.write_text(new_key_line() + "\n")
    path.chmod(0o644)
    with pytest.raises(StateError, match="accessible by group/others"):
        KeyRing.load(str(path))


def test_garbage_key_line_is_refused(tmp_path):
    with pytest.raises(StateError, match="line 2 is not a state key"):
        KeyRing.load(write_key_file(tmp_path / "k", new_key_line(), "not-a-key"))


def test_missing_state_dir(tmp_path):
    store = StateStore(
        str(tmp_path / "nope"), KeyRing.load(write_key_file(tmp_path / "k", new_key_line()))
    )
    with pytest.raises(StateError, match="state directory does not exist"):
        store.load()


def test_crash_between_write_and_rename_leaves_old_file(state_dir, tmp_path):
    """A process killed just before os.replace leaves the previous state readable."""
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    store.put("installs", "LOC1", {"v": "old"})
    save(store)
    store.close()
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from castghld.state import KeyRing, StateStore
        store = StateStore({state_dir!r}, KeyRing.load({key!r}))
        store.load()
        store.put("installs", "LOC1", {{"v": "new"}})
        os.replace = lambda *a: os._exit(9)  # the process dies where the rename would be
        asyncio.run(store.commit())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert result.returncode == 9
    assert open_store(state_dir, key).get("installs", "LOC1") == {"v": "old"}


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    path = tmp_path / "f"
    atomic_write(str(path), b"old")

    def explode(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(str(path), explode)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_concurrent_commits_coalesce(state_dir, tmp_path):
    store = open_store(state_dir, write_key_file(tmp_path / "k", new_key_line()))

    async def many():
        async def one(i):
            store.put("installs", f"LOC{i}", {"i": i})
            await store.commit()

        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(many())
    assert store.write_count < 50
    assert not store.dirty
    store.close()
    assert (
        open_store(
            state_dir, write_key_file(tmp_path / "k2", (tmp_path / "k").read_text().strip())
        ).count("installs")
        == 50
    )


def test_create_private_file_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k"
    create_private_file(str(path), b"a")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_private_file(str(path), b"b")
    assert path.read_bytes() == b"a"


def journal_files(state_dir) -> list[str]:
    return sorted(name for name in os.listdir(state_dir) if ".journal." in name)


def test_commit_appends_the_changed_record_not_the_whole_state(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    for i in range(2000):
        store.put("installs", f"LOC{i}", {"access_token": "a" * 1000, "i": i})
    save(store)
    snapshot = pathlib.Path(state_dir, STATE_FILENAME).read_bytes()
    store.put("installs", "LOC7", {"access_token": "new", "i": 7})
    store.delete("installs", "LOC8")
    save(store)
    store.close()
    assert pathlib.Path(state_dir, STATE_FILENAME).read_bytes() == snapshot
    [journal] = journal_files(state_dir)
    path = os.path.join(state_dir, journal)
    assert os.path.getsize(path) < 300  # one frame: two short records, not 2 MB
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert b"new" not in pathlib.Path(path).read_bytes()
    again = open_store(state_dir, key)
    assert again.get("installs", "LOC7") == {"access_token": "new", "i": 7}
    assert again.get("installs", "LOC8") is None
    assert again.count("installs") == 1999
    again.close()


def test_compaction_folds_journals_into_a_new_snapshot(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    store.compact_min_bytes = 2000

    async def refreshes():
        for i in range(60):
            store.put("installs", f"LOC{i % 5}", {"access_token": f"at-{i}" * 20})
            await store.commit()
        if store._compaction is not None:
            await store._compaction

    asyncio.run(refreshes())
    assert store.compactions >= 2
    store.close()
    assert len(journal_files(state_dir)) <= 1
    again = open_store(state_dir, key)
    assert again.get("installs", "LOC4") == {"access_token": "at-59" * 20}
    assert again.count("installs") == 5
    again.close()


def test_torn_last_commit_is_dropped_then_cut_away(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    store.put("installs", "LOC1", {"v": 1})
    save(store)
    store.put("installs", "LOC1", {"v": 2})
    save(store)
    store.put("installs", "LOC1", {"v": 3})
    save(store)
    store.close()
    path = os.path.join(state_dir, journal_files(state_dir)[0])
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:-7])  # the crash hit the last append
    store = open_store(state_dir, key)
    assert store.get("installs", "LOC1") == {"v": 2}
    store.put("installs", "LOC2", {"v": 1})
    save(store)
    store.close()
    again = open_store(state_dir, key)
    assert again.get("installs", "LOC1") == {"v": 2}
    assert again.get("installs", "LOC2") == {"v": 1}
    again.close()


def test_tampered_journal_commit_is_refused_naming_it(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    for v in range(3):
        store.put("installs", "LOC1", {"v": v})
        save(store)
    store.close()
    path = os.path.join(state_dir, journal_files(state_dir)[0])
    data = bytearray(pathlib.Path(path).read_bytes())
    data[20 + 30] ^= 0x01  # inside the first frame, not the last
    pathlib.Path(path).write_bytes(bytes(data))
    with pytest.raises(StateError) as info:
        open_store(state_dir, key)
    assert str(info.value) == (
        f"{path}: commit 1: authentication failed: the file is truncated or was altered"
    )


def test_snapshot_missing_under_a_journal_is_refused(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    for v in range(2):
        store.put("installs", "LOC1", {"v": v})
        save(store)
    store.close()
    os.unlink(os.path.join(state_dir, STATE_FILENAME))
    with pytest.raises(StateError, match="restore the state file from a backup"):
        open_store(state_dir, key)


def test_key_rotation_reencrypts_the_journal_too(state_dir, tmp_path):
    old = new_key_line()
    store = open_store(state_dir, write_key_file(tmp_path / "k1", old))
    for v in range(3):
        store.put("installs", "LOC1", {"v": v})
        save(store)
    store.close()
    assert journal_files(state_dir)
    new = new_key_line()
    store = open_store(state_dir, write_key_file(tmp_path / "k2", new, old))
    assert store.dirty
    save(store)
    store.close()
    assert journal_files(state_dir) == []
    only_new = open_store(state_dir, write_key_file(tmp_path / "k3", new))
    assert only_new.get("installs", "LOC1") == {"v": 2}
    only_new.close()


def test_format_1_state_file_still_loads_and_is_rewritten(state_dir, tmp_path):
    key = write_key_file(tmp_path / "k", new_key_line())
    keyring = KeyRing.load(key)
    document = b'{"format":1,"sections":{"installs":{"LOC1":{"v":1}}}}'
    atomic_write(os.path.join(state_dir, STATE_FILENAME), keyring.encrypt(document, b"state"))
    store = open_store(state_dir, key)
    assert store.get("installs", "LOC1") == {"v": 1}
    assert store.dirty
    save(store)
    store.close()
    assert not pathlib.Path(state_dir, STATE_FILENAME).read_bytes().startswith(b"CGS1")
    assert open_store(state_dir, key).get("installs", "LOC1") == {"v": 1}


def test_crash_during_compaction_loses_no_commit(state_dir, tmp_path):
    """Killed as the new snapshot would replace the old: old snapshot + both journals remain."""
    key = write_key_file(tmp_path / "k", new_key_line())
    store = open_store(state_dir, key)
    store.put("installs", "LOC0", {"v": 0})
    save(store)
    store.close()
    script = textwrap.dedent(
        f"""
        import asyncio, os, threading
        from castghld.state import KeyRing, StateStore
        store = StateStore({state_dir!r}, KeyRing.load({key!r}))
        store.load()
        store.compact_min_bytes = 0
        replaced = os.replace
        def die_in_compaction(*a):
            if threading.current_thread().name.startswith("castghld-state-compact"):
                os._exit(9)
            replaced(*a)
        os.replace = die_in_compaction
        async def main():
            for i in range(1, 40):
                store.put("installs", f"LOC{{i}}", {{"v": i}})
                await store.commit()
                print(i, flush=True)
        asyncio.run(main())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert result.returncode == 9
    acknowledged = result.stdout.split()
    assert acknowledged
    again = open_store(state_dir, key)
    for i in [0, *map(int, acknowledged)]:
        assert again.get("installs", f"LOC{i}") == {"v": i}
    again.close()

"""State key rotation as the README describes it, through a real `castghld serve` and its files.

The README's steps: put a new key first in `state.key_file` (old lines kept below), restart, then
remove the old key. A start under a key file whose first line is new re-encrypts the state file
and the outbox journal with it before it serves; a start that lacks a key something on disk still
needs refuses (exit 2) and names that key by its id, moving nothing aside.
"""

from __future__ import annotations

import asyncio
import base64
import os

import pytest
from daemon_process import ServeProcess

from castghld.fakes import wait_for
from castghld.files import LOCK_FILENAME
from castghld.journal import JOURNAL_FILENAME, QUARANTINE_FILENAME
from castghld.keyring import BLOB_MAGIC, KeyRing
from castghld.metrics import Metrics
from castghld.outbox import Outbox
from castghld.state import new_key_line

# A number mapped to loc2, which is not installed: a reply to it waits in the outbox.
LOC2_NUMBER = "09170000002"
EXTRA = {"cast": {"locations": {"loc2": {"inbound_numbers": [LOC2_NUMBER]}}}}


@pytest.fixture
def serve(config_dir, fake_ghl, fake_cast):
    process = ServeProcess(config_dir, fake_ghl, fake_cast, extra=EXTRA)
    yield process
    process.close()
    assert fake_ghl.violations == []
    assert fake_cast.violations == []


def key_lines(config_dir) -> list[str]:
    with open(config_dir.key_path) as f:
        return [line.strip() for line in f if line.strip()]


def write_keys(config_dir, *lines: str) -> None:
    with open(config_dir.key_path, "w") as f:  # the file exists 0600: its mode is kept
        f.write("".join(line + "\n" for line in lines))


def key_id(line: str) -> str:
    return KeyRing([base64.urlsafe_b64decode(line)]).key_ids[0]


def journal_key_ids(config_dir) -> set[str]:
    """The key id named by each line of outbox.log (read from its header, nothing decrypted)."""
    path = os.path.join(config_dir.state_dir, JOURNAL_FILENAME)
    with open(path, "rb") as f:
        blobs = [base64.b64decode(line) for line in f.read().splitlines() if line]
    return {blob[len(BLOB_MAGIC) : len(BLOB_MAGIC) + 8].hex() for blob in blobs}


async def queue_reply_for_loc2(serve, message_id: str) -> None:
    payload = {
        "message_id": message_id,
        "from": "09181234567",
        "to": LOC2_NUMBER,
        "message": "reply while loc2 is not installed",
        "received_at": "2026-11-26T09:00:00Z",
    }
    response = await serve.post_inbound(payload)
    assert response.code == 200


def read(config_dir, name: str) -> bytes:
    with open(os.path.join(config_dir.state_dir, name), "rb") as f:
        return f.read()


def quarantine_path(config_dir) -> str:
    return os.path.join(config_dir.state_dir, QUARANTINE_FILENAME)


@pytest.mark.gen_test(timeout=120)
async def test_rotation_as_documented_reencrypts_at_start_and_loses_no_waiting_message(
    serve, config_dir, fake_ghl
):
    [old] = key_lines(config_dir)
    await serve.start()
    await serve.install("loc1")  # the state file holds records under the old key
    await queue_reply_for_loc2(serve, "CASTIN-ROT")  # one journal line under the old key
    assert await serve.terminate() == 0
    new = new_key_line()
    write_keys(config_dir, new, old)
    await serve.start()
    # Once serving, nothing on disk needs the old key any more: a crash now must not change that.
    assert journal_key_ids(config_dir) == {key_id(new)}
    serve.kill9()
    write_keys(config_dir, new)
    await serve.start()
    await serve.install("loc2")
    await wait_for(lambda: len(fake_ghl.inbound_messages) == 1, timeout=20)
    [message] = fake_ghl.inbound_messages
    assert message["altId"] == "CASTIN-ROT"
    assert not os.path.exists(quarantine_path(config_dir))
    assert await serve.terminate() == 0
    assert len(fake_ghl.inbound_messages) == 1


@pytest.mark.gen_test(timeout=120)
async def test_start_without_a_key_the_outbox_still_needs_refuses_naming_its_id(
    serve, config_dir, fake_ghl
):
    [old] = key_lines(config_dir)
    await serve.start()
    await serve.install("loc1")
    await queue_reply_for_loc2(serve, "CASTIN-OLD")
    assert await serve.terminate() == 0
    journal = os.path.join(config_dir.state_dir, JOURNAL_FILENAME)
    with open(journal, "rb") as f:
        backup = f.read()  # outbox.log as a backup taken before the rotation holds it
    new = new_key_line()
    write_keys(config_dir, new, old)
    await serve.start()
    assert await serve.terminate() == 0
    write_keys(config_dir, new)
    with open(journal, "wb") as f:  # restored from that backup
        f.write(backup)
    serve.spawn()
    assert serve.proc.wait(timeout=30) == 2
    log = serve.log()
    assert f"key {key_id(old)}" in log
    assert old not in log
    assert "put" in log and "key file" in log
    assert not os.path.exists(quarantine_path(config_dir))
    with open(journal, "rb") as f:
        assert f.read() == backup  # nothing moved aside or rewritten
    # With the old key back as a later line, the reply is there and is delivered.
    write_keys(config_dir, new, old)
    await serve.start()
    await serve.install("loc2")
    await wait_for(lambda: len(fake_ghl.inbound_messages) == 1, timeout=20)
    assert fake_ghl.inbound_messages[0]["altId"] == "CASTIN-OLD"
    assert journal_key_ids(config_dir) == {key_id(new)}
    assert await serve.terminate() == 0


@pytest.mark.gen_test(timeout=120)
async def test_old_key_removed_before_a_restart_with_the_new_one_refuses_naming_it(
    serve, config_dir
):
    [old] = key_lines(config_dir)
    await serve.start()
    await serve.install("loc1")
    await queue_reply_for_loc2(serve, "CASTIN-SKIP")
    assert await serve.terminate() == 0
    state_files = {
        name: read(config_dir, name)
        for name in os.listdir(config_dir.state_dir)
        if name != LOCK_FILENAME
    }
    write_keys(config_dir, new_key_line())  # the old key replaced at once, no restart between
    serve.spawn()
    assert serve.proc.wait(timeout=30) == 2
    log = serve.log()
    assert f"key {key_id(old)}" in log
    assert old not in log
    for name, data in state_files.items():
        assert read(config_dir, name) == data, name
    assert not os.path.exists(quarantine_path(config_dir))


@pytest.mark.gen_test(timeout=10)
async def test_a_line_naming_a_key_no_start_used_is_damage_and_is_quarantined(tmp_path):
    line = new_key_line()
    keys = KeyRing([base64.urlsafe_b64decode(line)])
    outbox = Outbox(str(tmp_path), keys, Metrics(), 86400.0)
    outbox.pipelines["outbound"] = lambda outbox, rid: asyncio.sleep(0)
    outbox.load()
    await outbox.start()
    for n in range(3):
        await outbox.add(f"out:{n}", {"kind": "outbound", "message": f"text {n}"})
    await outbox.stop()
    path = tmp_path / JOURNAL_FILENAME
    lines = path.read_bytes().split(b"\n")
    blob = bytearray(base64.b64decode(lines[1]))
    blob[len(BLOB_MAGIC)] ^= 0xFF  # bit rot in the key id of its header
    lines[1] = base64.b64encode(bytes(blob))
    path.write_bytes(b"\n".join(lines))
    again = Outbox(str(tmp_path), keys, Metrics(), 86400.0)
    again.journal.retired_key_ids = frozenset({key_id(line), "0123456789abcdef"})
    again.load()
    assert list(again.records) == ["out:0", "out:2"]
    assert again.journal.unreadable == [2]


@pytest.mark.gen_test(timeout=120)
async def test_kill9_during_the_start_that_reencrypts_loses_nothing(serve, config_dir, fake_ghl):
    [old] = key_lines(config_dir)
    await serve.start()
    await serve.install("loc1")
    await queue_reply_for_loc2(serve, "CASTIN-KILL")
    assert await serve.terminate() == 0
    new = new_key_line()
    write_keys(config_dir, new, old)
    serve.spawn()
    # Killed once the state file is re-encrypted, while the outbox's turn is starting or running.
    await wait_for(lambda: "re-encrypted the state file" in serve.log(), timeout=30)
    serve.kill9()
    write_keys(config_dir, new)
    serve.spawn()
    try:
        await serve.wait_healthy()
    except AssertionError:
        # The outbox was not re-encrypted yet: the start refuses, naming the old key, and
        # moves nothing; with the old key back the same start re-encrypts and serves.
        assert serve.proc.wait(timeout=30) == 2
        assert f"key {key_id(old)}" in serve.log()
        write_keys(config_dir, new, old)
        await serve.start()
    await serve.install("loc2")
    await wait_for(lambda: len(fake_ghl.inbound_messages) == 1, timeout=20)
    assert fake_ghl.inbound_messages[0]["altId"] == "CASTIN-KILL"
    assert not os.path.exists(quarantine_path(config_dir))
    assert journal_key_ids(config_dir) == {key_id(new)}
    assert await serve.terminate() == 0

"""Adversarial review: races and crash points of the outbox, the state store and the token
lifecycle. Each test states the guarantee (from a module docstring) that it shows broken."""

from __future__ import annotations

import asyncio
import os

import pytest
from test_outbox import keyring, make_outbox, record

from castghld.outbox import JOURNAL_FILENAME


@pytest.mark.gen_test(timeout=10)
async def test_add_refused_with_oserror_during_a_compaction_is_not_sent_after_restart(tmp_path):
    """outbox.py: "A caller that gets an OSError ... must not acknowledge the message: nothing was
    stored and nothing will be sent." A compaction whose snapshot is taken while the `put` is
    queued (memory is ahead of the disk) writes the record into the new journal; the `put` then
    fails and the caller answers 503, but the record is on disk and is sent at the next start."""
    keys = keyring()
    outbox = make_outbox(tmp_path, keys)
    await outbox.start()
    await outbox.add("out:1", record(1))
    good_fd = outbox.journal._fd
    outbox.journal._fd = os.open("/dev/full", os.O_WRONLY)  # the next append fails (ENOSPC)
    adding = asyncio.ensure_future(outbox.add("out:2", record(2)))
    compaction = asyncio.ensure_future(outbox.compact())
    with pytest.raises(OSError):
        await adding  # the handler answers 503 store_failed: GHL is told it was not taken
    await compaction
    assert "out:2" not in outbox.records
    await outbox.stop()
    os.close(good_fd)
    assert os.path.exists(tmp_path / JOURNAL_FILENAME)
    again = make_outbox(tmp_path, keys)
    # Refused, yet replayed and dispatched (texted) at the next start:
    assert sorted(again.records) == ["out:1"]

"""Races and crash points of the outbox, the state store and the token lifecycle, found by an
adversarial review. Each test names the guarantee (a module docstring's) it once showed broken."""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest
from test_outbox import keyring, make_outbox, record

from castghld.journal import JOURNAL_FILENAME


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


@pytest.mark.gen_test(timeout=30)
async def test_mint_in_flight_when_the_location_is_uninstalled_installs_nothing(bridge):
    """tokens.py: "A refresh or mint in flight while the location is uninstalled ... never
    overwrites the newer pair", and "an INSTALL dated before the location's last UNINSTALL is
    ignored". A mint for a location with no pair yet (INSTALL webhook) compares generations
    None == None, so its answer, arriving after the UNINSTALL was stored, installs the location
    that GHL has just uninstalled (it is texted for until a reconciliation marks it)."""
    from test_agency import AGENCY, agency_installed
    from test_oauth import app_event, iso_timestamp, post_app_webhook

    from castghld.fakes import wait_for

    await agency_installed(bridge, ["locA"])
    bridge.ghl.add_company_location(AGENCY, "locB")
    bridge.ghl.hang("location_token")
    install = app_event("INSTALL", "locB", AGENCY, timestamp=iso_timestamp(seconds_ago=5))
    installing = asyncio.ensure_future(post_app_webhook(bridge, install))
    await wait_for(lambda: bridge.ghl.hung("location_token") == 1)
    uninstall = app_event("UNINSTALL", "locB", AGENCY)  # dated now: after the INSTALL
    assert (await post_app_webhook(bridge, uninstall)).code == 200
    assert bridge.daemon.state.get("uninstalls", "locB") is not None  # the tombstone is stored
    bridge.ghl.release("location_token")
    assert (await installing).code == 200
    assert bridge.daemon.installations.get("locB") is None


@pytest.mark.gen_test(timeout=30)
async def test_code_exchange_answered_during_a_stop_is_stored_not_lost(bridge, config_dir):
    """tokens.py: a pair GHL hands us is stored; at shutdown token requests in flight get
    REFRESH_STOP_WAIT "to store their answer". Refreshes and mints are waited for, a code
    exchange (the OAuth callback, `install_from_code`) is not: it only gets the request drain
    (server.shutdown_timeout - 7 s, here 1 s). Its answer then meets a closed state store: GHL
    has spent the code, the pair is lost and the install must be redone."""
    from test_oauth import callback, stored_on_disk

    from castghld.fakes import wait_for

    await bridge.start({"server": {"shutdown_timeout": 1}})
    bridge.ghl.add_auth_code("code-slow", location_id="locS")
    bridge.ghl.hang("token")
    calling = asyncio.ensure_future(callback(bridge, code="code-slow"))
    await wait_for(lambda: bridge.ghl.hung("token") == 1)
    stopping = asyncio.ensure_future(bridge.stop())
    await asyncio.sleep(2.0)  # past the request drain; refreshes would still be waited for
    bridge.ghl.release("token")  # GHL answers: the code is spent now
    await stopping
    await asyncio.gather(calling, return_exceptions=True)  # cut by the stop, or a 500
    await asyncio.sleep(0.2)
    assert stored_on_disk(config_dir, "installs", "locS") is not None


@pytest.mark.gen_test(timeout=30)
async def test_location_installed_while_the_installed_list_is_fetched_is_not_marked(bridge):
    """tokens.py `_reconcile_company` marks ``uninstalled`` every location of the company missing
    from a list fetched *before* it looks at the installs, without regard to when they were
    installed. A location installed while the list request is out (a bulk install: the agency
    callback's reconciliation runs while INSTALL webhooks and callbacks keep arriving) is marked
    from that stale list: its outbound SMS are answered "ignored" (not sent, never reported) until
    the next reconciliation, up to tokens.reconcile_interval (1 h) later."""
    from test_agency import AGENCY, agency_installed

    from castghld.fakes import wait_for

    await agency_installed(bridge, ["locA"])
    installations = bridge.daemon.installations
    bridge.ghl.hang("installed_locations")
    reconciling = asyncio.ensure_future(installations.reconcile())
    await wait_for(lambda: bridge.ghl.hung("installed_locations") == 1)
    await bridge.install("locN", company_id=AGENCY)  # installed after the list was asked for
    assert installations.get("locN") is not None
    # GHL answers with the list as it was when the request reached it: locA only. (The fake
    # builds its answer on release, so locN is taken out for the answer and put back after.)
    bridge.ghl._company_locations[AGENCY].discard("locN")
    bridge.ghl.release("installed_locations")
    await wait_for(lambda: bridge.ghl.hung("installed_locations") == 0)
    bridge.ghl.add_company_location(AGENCY, "locN")
    await reconciling
    assert installations.get("locN") is not None, installations.state.get("installs", "locN")


def test_snapshot_left_by_a_crash_mid_compaction_is_removed_at_start(daemons, config_dir):
    """outbox.py/state.py write a compaction to ``.tmp-outbox-*`` / ``.tmp-*`` (mkstemp) and rename
    it; a kill -9 before the rename leaves the file (a whole encrypted snapshot: every live
    message and seen id). Each crash inside a compaction would add one, so a crash loop would fill
    the state directory's disk; the daemon removes them at start, under the directory lock."""
    daemons.stop(daemons.start())
    leftovers = []
    for prefix in (".tmp-outbox-", ".tmp-"):  # the outbox's and the state store's
        fd, leftover = tempfile.mkstemp(prefix=prefix, dir=config_dir.state_dir)
        os.write(fd, b"x" * 100_000)
        os.close(fd)
        leftovers.append(leftover)
    daemon = daemons.start()
    assert [path for path in leftovers if os.path.exists(path)] == []
    assert os.path.exists(os.path.join(config_dir.state_dir, JOURNAL_FILENAME))
    daemons.stop(daemon)


@pytest.mark.gen_test(timeout=10)
async def test_add_whose_caller_is_cancelled_is_refused_or_stored_and_sent(tmp_path):
    """outbox.py: `add` "Raises OSError if it could not be stored: then it is not kept and not
    dispatched". Its caller cancelled while the write ran (the write goes on) left the record in
    memory: `known` said yes, so GHL's next retry was answered 'duplicate' although the write had
    failed (acknowledged, never stored); and a write that succeeded was not dispatched before the
    next restart."""
    from test_outbox import Recorder

    from castghld.fakes import wait_for

    recorder = Recorder()
    keys = keyring()
    outbox = make_outbox(tmp_path, keys, recorder)
    await outbox.start()
    good_fd = outbox.journal._fd
    outbox.journal._fd = os.open("/dev/full", os.O_WRONLY)  # the next append fails (ENOSPC)
    adding = asyncio.ensure_future(outbox.add("out:1", record(1)))
    await asyncio.sleep(0)  # its `put` is being written
    adding.cancel()
    with pytest.raises(OSError):  # GHL's retry meanwhile: 503, not 'duplicate'
        await outbox.add("out:1", record(1))
    assert not outbox.known("out:1")
    os.close(outbox.journal._fd)
    outbox.journal._fd = good_fd
    adding = asyncio.ensure_future(outbox.add("out:2", record(2)))
    await asyncio.sleep(0)
    adding.cancel()
    await wait_for(lambda: recorder.seen == ["out:2"])  # stored, then sent without a restart
    assert outbox.known("out:2")
    await outbox.stop()
    again = make_outbox(tmp_path, keys)
    assert again.known("out:2")
    assert not again.known("out:1")


@pytest.mark.gen_test(timeout=10)
async def test_drop_while_the_put_is_written_is_not_sent_and_raises_nothing(tmp_path, caplog):
    """`castghld outbox drop` of a message whose `put` is still being written: the drop wins
    (not sent, now or after a restart) and the webhook is answered 200. The dispatch after the
    write found no record: a KeyError (a 500 to GHL, then an error logged from a loop callback
    once `add` settled its write in one)."""
    from test_outbox import Recorder

    recorder = Recorder()
    keys = keyring()
    outbox = make_outbox(tmp_path, keys, recorder)
    await outbox.start()
    adding = asyncio.ensure_future(outbox.add("out:1", record(1)))
    await asyncio.sleep(0)  # its `put` is being written
    assert await outbox.drop("out:1") is True
    assert await adding is True
    await outbox.wait_idle()
    await outbox.stop()
    assert recorder.seen == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    again = make_outbox(tmp_path, keys)
    assert again.records == {}
    assert again.known("out:1")

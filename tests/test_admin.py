"""`castghld outbox ...`, `forget` and `installs --json` beside a running `castghld serve`."""

from __future__ import annotations

import json
import os
import stat
import urllib.request

from castghld import cli
from tests.test_serve import start_serve, wait_for_port

REPLY = {
    "message_id": "CASTIN9",
    "from": "09181234567",
    "to": "09171234567",
    "message": "a private reply",
}


def post_reply(port: int, **fields) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/cast/v1/webhook/inbound",
        data=json.dumps({**REPLY, **fields}).encode(),
        headers={"Authorization": "Bearer inbound-secret", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (http literal)
        return response.status


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_outbox_commands_against_a_running_daemon(config_dir, capsys):
    path = config_dir.write()
    proc = start_serve(path)
    try:
        port = wait_for_port(proc)
        sock = os.path.join(config_dir.state_dir, "admin.sock")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # No location installed: the reply waits in the outbox.
        assert post_reply(port) == 200
        code, out, _ = run(capsys, "--config", path, "outbox", "list")
        assert code == 0 and "in:CASTIN9" in out and "inbound" in out
        code, out, _ = run(capsys, "outbox", "show", "in:CASTIN9", "--json", "--config", path)
        assert code == 0
        shown = json.loads(out)
        assert shown["cast_id"] == "CASTIN9" and shown["from"] == "…4567"
        assert "a private reply" not in out and "9181234567" not in out
        code, out, _ = run(capsys, "--config", path, "outbox", "retry", "in:CASTIN9")
        assert (code, out.strip()) == (0, "in:CASTIN9: retried")
        code, out, _ = run(capsys, "--config", path, "outbox", "drop", "in:CASTIN9")
        assert (code, out.strip()) == (0, "in:CASTIN9: dropped")
        code, out, _ = run(capsys, "--config", path, "outbox")
        assert (code, out.strip()) == (0, "outbox empty")
        code, _, err = run(capsys, "--config", path, "outbox", "show", "in:nope")
        assert code == 1 and "no unfinished message in:nope" in err
        code, _, err = run(capsys, "--config", path, "forget", "loc-unknown")
        assert code == 1 and "not installed" in err
        # The same reply again is still a duplicate: dropping kept its id.
        assert post_reply(port) == 200
        code, out, _ = run(capsys, "--config", path, "outbox", "list")
        assert out.strip() == "outbox empty"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()
    assert not os.path.exists(sock)


def test_outbox_list_shows_the_oldest_first_and_says_how_many_more(config_dir, capsys):
    """A campaign leaves 100k waiting: listing them all would hold the daemon's loop for
    seconds, so the list is the N oldest (default 100) and says how many there are."""
    path = config_dir.write()
    proc = start_serve(path)
    try:
        port = wait_for_port(proc)
        for n in (3, 1, 2):  # accepted in this order: ids do not sort like acceptance
            assert post_reply(port, message_id=f"CASTIN{n}") == 200
        code, out, _ = run(capsys, "--config", path, "outbox", "list", "--limit", "2")
        lines = out.strip().splitlines()
        assert lines[0].split() == ["ID", "KIND", "STAGE", "LOCATION", "AGE"]
        ids = [line.split()[0] for line in lines[1:3]]
        assert code == 0 and ids == ["in:CASTIN3", "in:CASTIN1"]
        assert lines[3] == "... the 2 oldest of 3 unfinished messages (--limit N shows more)"
        code, out, _ = run(capsys, "--config", path, "outbox", "list", "--json")
        doc = json.loads(out)
        assert doc["total"] == 3 and len(doc["records"]) == 3
        for bad in ("0", "10001"):
            code, _, err = run(capsys, "--config", path, "outbox", "list", "--limit", bad)
            assert code == 1 and "limit must be 1..10000" in err
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()


def test_outbox_without_a_daemon_says_so(config_dir, capsys):
    path = config_dir.write()
    code, _, err = run(capsys, "--config", path, "outbox", "list")
    assert code == cli.EXIT_TEMPFAIL
    assert "no running castghld answers" in err


def test_installs_json_without_installations(config_dir, capsys):
    path = config_dir.write()
    code, out, _ = run(capsys, "--config", path, "installs", "--json")
    assert code == 0 and json.loads(out) == {"installations": []}

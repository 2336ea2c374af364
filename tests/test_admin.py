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


def test_odd_ids_get_a_clear_answer_and_no_traceback(config_dir, capsys):
    """An id far over the daemon's request limit, `../`, unicode, `?` and `%`: each is refused or
    not found with one line on stderr, never a traceback."""
    path = config_dir.write()
    proc = start_serve(path)
    try:
        wait_for_port(proc)
        for given in ("x" * 20_000, "../../accounts", "ñ日本/..", "a?limit=1", "%2e%2e"):
            expected = 2 if len(given) > 1000 else 1  # a usage error, or not found
            for action in ("show", "retry", "drop"):
                code, _, err = run(capsys, "--config", path, "outbox", action, given)
                assert code == expected, (given[:20], action, err)
                assert "Traceback" not in err and len(err.splitlines()) == 1
            code, _, err = run(capsys, "--config", path, "forget", given)
            assert code == expected and len(err.splitlines()) == 1, (given[:20], err)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()


def test_a_socket_that_closes_without_an_answer_is_one_line_not_a_traceback(
    config_dir, capsys, tmp_path
):
    """Something listens at the admin socket but hangs up without answering (a daemon stopping):
    the command says so in one line and exits 75 (try again later)."""
    import socket
    import threading

    sock_path = str(tmp_path / "admin.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(4)

    def hang_up() -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            connection.recv(65536)
            connection.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    path = config_dir.write({"server": {"admin_socket": sock_path}})
    try:
        for argv in (["outbox", "list"], ["forget", "loc1"]):
            code, _, err = run(capsys, "--config", path, *argv)
            assert code == 75 and "no answer from castghld" in err
            assert "Traceback" not in err and len(err.splitlines()) == 1
    finally:
        thread.join(timeout=5)
        listener.close()

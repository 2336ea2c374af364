"""`castghld serve` under journald, as a subprocess: every line at error carries the `<3>`
priority prefix (start-up failures included), a start that fails before listening says why and
not "stopping ... draining", and scrapes and probes are logged at debug."""

from __future__ import annotations

import os
import subprocess
import sys

import tornado.testing

from tests.test_serve import start_serve, wait_for_port


def serve_under_journal(config_path: str, tmp_path, *args: str) -> tuple[int, list[str]]:
    """Run `castghld ... serve` (or `args`) to its end with stderr in a file that
    `$JOURNAL_STREAM` names, as systemd does for a unit's stderr; (exit code, stderr lines)."""
    log_path = tmp_path / "journal.log"
    with open(log_path, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        command = [sys.executable, "-m", "castghld", "--config", config_path, *(args or ["serve"])]
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stderr=stderr, env=env, timeout=60, check=False
        )
    return result.returncode, log_path.read_text().splitlines()


def assert_every_line_has_a_priority(lines: list[str]) -> None:
    assert lines
    for line in lines:
        assert line[:3] in {"<2>", "<3>", "<4>", "<6>", "<7>"}, line


def test_missing_state_directory_is_logged_at_err(config_dir, tmp_path):
    path = config_dir.write({"state": {"dir": str(tmp_path / "no-such-dir")}})
    code, lines = serve_under_journal(path, tmp_path)
    assert code == 2
    assert_every_line_has_a_priority(lines)
    assert any(line.startswith("<3>") and "no-such-dir" in line for line in lines), lines


def test_config_error_at_start_is_logged_at_err(config_dir, tmp_path):
    path = config_dir.write({"cast": {"messages_per_secnd": 5}})
    code, lines = serve_under_journal(path, tmp_path)
    assert code == 2
    assert_every_line_has_a_priority(lines)
    assert any(line.startswith("<3>") and "messages_per_secnd" in line for line in lines), lines


def test_address_in_use_is_logged_at_err_without_a_drain(config_dir, tmp_path):
    taken, port = tornado.testing.bind_unused_port()
    taken.listen(1)
    try:
        code, lines = serve_under_journal(config_dir.write({"server": {"port": port}}), tmp_path)
    finally:
        taken.close()
    assert code == 75
    assert_every_line_has_a_priority(lines)
    assert any(line.startswith("<3>") and "cannot listen" in line for line in lines), lines
    text = "\n".join(lines)
    assert "draining" not in text and "stopping" not in text, text


def test_reconcile_beside_a_running_daemon_exits_75(config_dir, tmp_path):
    proc = start_serve(config_dir.write())
    try:
        wait_for_port(proc)
        code, lines = serve_under_journal(config_dir.config_path, tmp_path, "reconcile")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stderr.close()
    assert code == 75, lines
    assert any("another castghld process" in line for line in lines), lines
    assert all(line.startswith("<3>") for line in lines), lines

"""Issue 11: transient startup failures exit 75 (systemd restarts), config errors exit 2 (it does
not); the unit restarts on 75 and stops on 2."""

from __future__ import annotations

import configparser
import errno
import fcntl
import os
import pathlib
import socket
import subprocess
import sys

UNIT = pathlib.Path(__file__).parent.parent.parent / "systemd" / "castghld.service"


def serve(config_path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "castghld", "--config", config_path, "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_address_in_use_exits_75(config_dir):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        result = serve(config_dir.write({"server": {"port": port}}))
    finally:
        taken.close()
    assert result.returncode == 75, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_state_directory_locked_by_another_process_exits_75(config_dir):
    from castghld.state import LOCK_FILENAME

    path = os.path.join(config_dir.state_dir, LOCK_FILENAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = serve(config_dir.write())
    finally:
        os.close(fd)
    assert result.returncode == 75, result.stderr
    assert "another castghld process" in result.stderr


def test_unreadable_state_file_exits_75_on_eio_and_2_on_a_config_problem(config_dir):
    # EIO cannot be provoked portably without root; EISDIR (a directory where the state file
    # belongs) is an operator mistake: exit 2. The EIO branch is the same code with another errno.
    from castghld.state import STATE_FILENAME

    os.mkdir(os.path.join(config_dir.state_dir, STATE_FILENAME))
    result = serve(config_dir.write())
    assert result.returncode == 2, result.stderr


def test_io_errors_a_retry_may_not_meet_are_transient():
    from castghld.state import StateError, is_transient

    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(OSError(errno.EADDRINUSE, "Address already in use"))
    assert not is_transient(OSError(errno.EACCES, "Permission denied"))
    assert not is_transient(StateError("state.bin: authentication failed"))


def test_unit_restarts_on_75_and_not_on_2():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == ["2"]

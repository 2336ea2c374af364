"""A config file the service user cannot read (a copy made under umask 077, root-owned 0600):
the pre-start check says what to do, not only "Permission denied"."""

from __future__ import annotations

import os

from castghld.config import ConfigError, load_config

NOBODY = 65534


def load_as_another_user(path: str) -> str:
    """`load_config(path)` as a user that does not own the file (as systemd's DynamicUser is):
    "ok", or the problem lines. As root, a forked child drops to nobody (the code is loaded
    already; the interpreter under /root could not be run again by nobody)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o000)  # the file's owner loses read access like another user has none
        try:
            load_config(path)
            return "ok"
        except ConfigError as e:
            return "\n".join(e.problems)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                load_config(path)
                answer = "ok"
            except ConfigError as e:
                answer = "\n".join(e.problems)
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_an_unreadable_config_says_which_mode_it_needs(config_dir):
    path = config_dir.write()
    os.chmod(path, 0o600)  # `cp` under umask 077
    problems = load_as_another_user(path)
    assert problems == (
        f"{path}: cannot read config file: permission denied; the service user must read it: "
        f"chmod 644 {path} (it holds no secret when they are *_file credentials) and chmod 755 "
        "its directory"
    )

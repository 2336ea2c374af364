"""Shared fixtures: a config on disk, a state key, and a daemon running in-process on loopback.

Fixtures are synchronous (pytest-tornado's io_loop runs async setup with run_sync).
"""

from __future__ import annotations

import copy
import os

import pytest
import tornado.testing
import yaml

from castghld.app import Daemon, configure_http_client
from castghld.config import load_config
from castghld.state import create_private_file, new_key_line

configure_http_client()

BASE_CONFIG = {
    "server": {"host": "127.0.0.1", "port": 0, "public_url": "https://ghl.example.ph"},
    "ghl": {"client_id": "test-client", "client_secret": "test-secret"},
    "cast": {"api_key": "cast_test_key", "inbound_secret": "inbound-secret"},
    "state": {"dir": "state", "key_file": "state.key"},
    "logging": {"level": "debug"},
}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class ConfigDir:
    """A directory holding castghld.yaml, state.key and state/ (paths relative to it)."""

    def __init__(self, path):
        self.path = path
        self.config_path = str(path / "castghld.yaml")
        self.key_path = str(path / "state.key")
        self.state_dir = str(path / "state")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        if not os.path.exists(self.key_path):
            create_private_file(self.key_path, (new_key_line() + "\n").encode())

    def write(self, extra: dict | None = None, raw: str | None = None) -> str:
        with open(self.config_path, "w") as f:
            f.write(raw if raw is not None else yaml.safe_dump(merge(BASE_CONFIG, extra or {})))
        return self.config_path

    def load(self, extra: dict | None = None):
        return load_config(self.write(extra))


@pytest.fixture
def config_dir(tmp_path) -> ConfigDir:
    return ConfigDir(tmp_path)


class DaemonRunner:
    """Starts and stops in-process daemons on the test's io_loop."""

    def __init__(self, io_loop, config_dir: ConfigDir):
        self.io_loop = io_loop
        self.config_dir = config_dir
        self.running: list[Daemon] = []

    def start(self, extra: dict | None = None) -> Daemon:
        daemon = Daemon(self.config_dir.load(extra))
        sock, _ = tornado.testing.bind_unused_port()
        self.io_loop.run_sync(lambda: daemon.start([sock]))
        self.running.append(daemon)
        return daemon

    def stop(self, daemon: Daemon) -> None:
        self.io_loop.run_sync(daemon.stop)
        self.running.remove(daemon)

    def stop_all(self) -> None:
        for daemon in list(self.running):
            self.stop(daemon)


@pytest.fixture
def daemons(io_loop, config_dir):
    runner = DaemonRunner(io_loop, config_dir)
    yield runner
    runner.stop_all()

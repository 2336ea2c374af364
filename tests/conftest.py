"""Shared fixtures: a config on disk, a state key, and a daemon running in-process on loopback.

Fixtures are synchronous (pytest-tornado's io_loop runs async setup with run_sync).
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import tornado.httpserver
import tornado.testing
import tornado.web
import yaml
from tornado.httpclient import AsyncHTTPClient

from castghld.app import Daemon, configure_http_client
from castghld.config import load_config
from castghld.state import create_private_file, new_key_line

configure_http_client()


def pytest_addoption(parser):
    parser.addoption(
        "--soak",
        action="store_true",
        help="also run the long reliability runs (tests marked `soak`) and run the crash storm "
        "at full scale (minutes; not part of the default CI run)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: a long run, collected always, run only with --soak")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: long by design, runs only with `pytest --soak`")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def soak(request) -> bool:
    """True under `pytest --soak`: tests that scale with it run at full size."""
    return request.config.getoption("--soak")


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


class Bridge:
    """A daemon wired to a fake GHL and a fake Cast on loopback, with helpers to drive it."""

    def __init__(self, io_loop, config_dir: ConfigDir, runner: DaemonRunner, ghl, cast):
        self.io_loop = io_loop
        self.config_dir = config_dir
        self.runner = runner
        self.ghl = ghl
        self.cast = cast
        key_dir = config_dir.path / "webhook-keys"
        key_dir.mkdir(exist_ok=True)
        self.extra = {
            "ghl": {
                "api_base": ghl.url,
                "webhook_public_keys": ghl.write_public_keys(key_dir),
            },
            "cast": {"api_base": cast.url},
            "delivery": {"status_polls": [0.05, 0.1, 0.2]},
        }
        self.daemon: Daemon | None = None

    async def start(self, extra: dict | None = None) -> Daemon:
        """Start (or restart) the daemon on the test's loop; the runner stops it at teardown."""
        daemon = Daemon(self.config_dir.load(merge(self.extra, extra or {})))
        sock, _ = tornado.testing.bind_unused_port()
        await daemon.start([sock])
        self.runner.running.append(daemon)
        self.daemon = daemon
        return daemon

    async def stop(self) -> None:
        """Graceful stop (as on SIGTERM)."""
        if self.daemon is not None:
            await self.daemon.stop()
            self.runner.running.remove(self.daemon)
            self.daemon = None

    async def install(self, location_id: str, company_id: str = "comp1") -> None:
        """Install a location through the real OAuth callback."""
        code = f"code-{location_id}"
        self.ghl.add_auth_code(code, location_id=location_id, company_id=company_id)
        response = await AsyncHTTPClient().fetch(
            f"{self.daemon.url}/oauth/callback?code={code}", raise_error=False
        )
        assert response.code == 200, response.body

    async def update_status(self, location_id: str, message_id: str) -> None:
        """A GHL call that needs the location's stored token (PUT message status), made through
        `GHLClient.call` with its refresh-on-401 and retries; the fake checks whose token it is."""
        daemon = self.daemon
        await daemon.ghl.call(
            daemon.installations,
            location_id,
            "PUT",
            f"/conversations/messages/{message_id}/status",
            json_body={"status": "delivered"},
            deadline=time.monotonic() + 5,
        )

    async def post_message(self, payload: dict | None = None, **fields):
        """A signed ProviderOutboundMessage webhook; the response."""
        body = {
            "contactId": "contact-1",
            "locationId": "loc1",
            "messageId": "msg-1",
            "type": "SMS",
            "phone": "+639171234567",
            "message": "Hello from GHL",
            "attachments": [],
            "userId": "user-1",
        }
        body.update(payload or {})
        body.update(fields)
        return await self.ghl.post_webhook(self.daemon.url + "/api/ghl/v1/webhook/messages", body)


@pytest.fixture
def fake_ghl(io_loop):
    from castghld.fakes import FakeGHL

    fake = FakeGHL()
    io_loop.run_sync(fake.start)
    yield fake
    io_loop.run_sync(fake.stop)


@pytest.fixture
def fake_cast(io_loop):
    from castghld.fakes import FakeCast

    fake = FakeCast()
    io_loop.run_sync(fake.start)
    yield fake
    io_loop.run_sync(fake.stop)


@pytest.fixture
def bridge(io_loop, config_dir, daemons, fake_ghl, fake_cast):
    """Fakes started, daemon not yet: call `bridge.start(extra)` in the test."""
    yield Bridge(io_loop, config_dir, daemons, fake_ghl, fake_cast)
    assert fake_ghl.violations == []
    assert fake_cast.violations == []


class _Record(tornado.web.RequestHandler):
    """Records every request that reaches it: a redirect target must see none."""

    def initialize(self, seen: list) -> None:
        self.seen = seen

    def prepare(self) -> None:
        self.seen.append((self.request.method, dict(self.request.headers), self.request.body))
        self.finish("{}")


@pytest.fixture
def elsewhere():
    """(url, requests it received) of a server on loopback a hostile 3xx may point at."""
    seen: list = []
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(
        tornado.web.Application([(r"/.*", _Record, {"seen": seen})])
    )
    server.add_sockets([sock])
    yield f"http://127.0.0.1:{port}/collect", seen
    server.stop()

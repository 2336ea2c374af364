"""`castghld serve` as a real subprocess against the fakes in the test process.

Shared by the kill -9 / full-disk tests and the reliability suite (tests/reliability/): the daemon
talks to the fakes over loopback as in production, and everything a test learns about it comes
from the outside (HTTP answers, /metrics, its log, the files in its state directory, the CLI).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import tornado.testing
from conftest import BASE_CONFIG, merge
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from castghld.fakes import wait_for

WEBHOOK_MESSAGES = "/api/ghl/v1/webhook/messages"
WEBHOOK_INBOUND = "/api/cast/v1/webhook/inbound"


class ServeProcess:
    """`castghld serve` in a subprocess on a fixed port, restartable on the same state.

    Its stderr (the log) is appended to ``serve.log`` across restarts; every `/metrics` text read
    through `metrics()` is kept in ``scrapes`` (the leak audit reads both).
    """

    def __init__(self, config_dir, ghl, cast, log_to_file: bool = True, extra: dict | None = None):
        sock, self.port = tornado.testing.bind_unused_port()
        sock.close()
        (config_dir.path / "webhook-keys").mkdir(exist_ok=True)
        keys = ghl.write_public_keys(config_dir.path / "webhook-keys")
        base = {
            "server": {"port": self.port, "shutdown_timeout": "5s"},
            "ghl": {"api_base": ghl.url, "webhook_public_keys": keys},
            "cast": {"api_base": cast.url},
            "delivery": {"status_polls": [0.05, 0.1, 0.2]},
            "logging": {"level": "info"},
        }
        self.config_path = config_dir.write(merge(base, extra or {}))
        self.state_dir = config_dir.state_dir
        self.log_path = config_dir.path / "serve.log"
        self.log_to_file = log_to_file
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.ghl = ghl
        self.cast = cast
        self.scrapes: list[str] = []
        assert BASE_CONFIG["server"]["host"] == "127.0.0.1"

    def spawn(self) -> subprocess.Popen:
        """Start the process without waiting for it (see `wait_healthy`)."""
        stderr = open(self.log_path, "ab") if self.log_to_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "castghld", "--config", self.config_path, "serve"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        finally:
            if self.log_to_file:
                stderr.close()
        return self.proc

    async def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited: {self.log()[-4000:]}"
            try:
                response = await AsyncHTTPClient().fetch(self.url + "/healthz", raise_error=False)
            except (OSError, HTTPClientError):  # not listening yet
                response = None
            if response is not None and response.code == 200:
                return
            await asyncio.sleep(0.05)  # polling for readiness, bounded by the deadline
        raise AssertionError(f"daemon did not become healthy: {self.log()[-4000:]}")

    async def start(self) -> None:
        self.spawn()
        await self.wait_healthy()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    async def terminate(self) -> int:
        """SIGTERM, then wait without blocking the loop (the fakes must keep answering)."""
        self.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: self.proc.poll() is not None, timeout=30)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """Run an operator command (`installs`, `check-config`) on this daemon's config."""
        command = [sys.executable, "-m", "castghld", "--config", self.config_path, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    async def metrics(self) -> str:
        response = await AsyncHTTPClient().fetch(self.url + "/metrics")
        text = response.body.decode()
        self.scrapes.append(text)
        return text

    async def install(self, location_id: str) -> None:
        code = f"code-{location_id}"
        self.ghl.add_auth_code(code, location_id=location_id)
        response = await AsyncHTTPClient().fetch(f"{self.url}/oauth/callback?code={code}")
        assert response.code == 200

    async def post_message(self, message_id: str, **fields):
        body = {
            "locationId": "loc1",
            "messageId": message_id,
            "contactId": "c1",
            "type": "SMS",
            "phone": "09171234567",
            "message": f"hello {message_id}",
            **fields,
        }
        return await self.ghl.post_webhook(self.url + WEBHOOK_MESSAGES, body)

    async def post_inbound(self, payload: dict):
        """A received SMS, posted as Cast does with the configured inbound secret."""
        secret = BASE_CONFIG["cast"]["inbound_secret"]
        return await self.cast.post_inbound(self.url + WEBHOOK_INBOUND, secret, payload)

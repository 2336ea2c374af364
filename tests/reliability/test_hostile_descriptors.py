"""Issue 11: a flood of connections beyond RLIMIT_NOFILE (EMFILE on accept) does not take the
daemon down or spin it: it pauses accepting, logs once, and serves normally afterwards. The unit
raises the limit (LimitNOFILE)."""

from __future__ import annotations

import asyncio
import configparser
import pathlib
import resource
import subprocess
import sys

import pytest
from daemon_process import ServeProcess

from castghld.fakes import wait_for

UNIT = pathlib.Path(__file__).parent.parent.parent / "systemd" / "castghld.service"
NOFILE = 128
CONNECTIONS = 400


class LimitedServe(ServeProcess):
    """The daemon with a soft and hard RLIMIT_NOFILE of NOFILE."""

    def spawn(self) -> subprocess.Popen:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

        with open(self.log_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "castghld", "--config", self.config_path, "serve"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=limit,
            )
        return self.proc


async def open_many(port: int, count: int) -> list[asyncio.StreamWriter]:
    async def one():
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        except (OSError, asyncio.TimeoutError):
            return None
        return writer

    return [w for w in await asyncio.gather(*(one() for _ in range(count))) if w is not None]


@pytest.mark.gen_test(timeout=90)
async def test_emfile_storm_pauses_accepting_and_the_daemon_serves_after(
    config_dir, fake_ghl, fake_cast
):
    serve = LimitedServe(config_dir, fake_ghl, fake_cast)
    try:
        await serve.start()
        await serve.install("loc1")
        held = await open_many(serve.port, CONNECTIONS)
        assert len(held) > NOFILE  # the kernel's backlog took more than the daemon can accept
        await wait_for(lambda: "out of file descriptors" in serve.log(), timeout=20)
        assert serve.proc.poll() is None
        for writer in held:
            writer.close()
        await serve.wait_healthy()
        assert (await serve.post_message("after-storm")).code == 200
        await wait_for(lambda: any(s["idempotency_key"] == "after-storm" for s in fake_cast.sent))
        log = serve.log()
        assert "Exception in callback" not in log
        assert "Traceback" not in log
        assert log.count("out of file descriptors") <= 3  # one line per storm, not per accept
        assert "castghld_accept_paused_total" in await serve.metrics()
        assert await serve.terminate() == 0
    finally:
        serve.close()


def test_unit_raises_the_descriptor_limit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    assert int(unit["Service"]["LimitNOFILE"]) >= 65536

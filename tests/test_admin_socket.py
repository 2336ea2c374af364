"""Where the admin socket lives and what it refuses, through a real `castghld serve` process:
the runtime directory (systemd's `RuntimeDirectory=castghld`), not the state files; something
that is not a socket at its path; a request over a sane size."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest
from daemon_process import ServeProcess

from castghld import admin_client, cli


@pytest.fixture
def serve(config_dir, fake_ghl, fake_cast):
    process = ServeProcess(config_dir, fake_ghl, fake_cast)
    yield process
    process.close()


@pytest.mark.gen_test(timeout=60)
async def test_socket_is_in_the_runtime_directory_and_found_there(
    serve, tmp_path, monkeypatch, capsys
):
    runtime = tmp_path / "run-castghld"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))  # what systemd sets for the unit
    await serve.start()
    sock = runtime / "admin.sock"
    assert stat.S_ISSOCK(os.stat(sock).st_mode) and stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert "admin.sock" not in os.listdir(serve.state_dir)
    # An operator's shell has no $RUNTIME_DIRECTORY: the CLI looks in /run/castghld (here the
    # same directory), then in state.dir.
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setattr(admin_client, "RUNTIME_DIR_DEFAULT", str(runtime))
    assert cli.main(["--config", serve.config_path, "outbox"]) == 0
    assert capsys.readouterr().out.strip() == "outbox empty"
    assert await serve.terminate() == 0
    assert not sock.exists()


@pytest.mark.gen_test(timeout=60)
async def test_server_admin_socket_puts_it_where_the_config_says(
    config_dir, fake_ghl, fake_cast, tmp_path
):
    path = tmp_path / "elsewhere" / "castghld.sock"
    path.parent.mkdir()
    serve = ServeProcess(
        config_dir, fake_ghl, fake_cast, extra={"server": {"admin_socket": str(path)}}
    )
    try:
        await serve.start()
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        result = serve.cli("outbox")
        assert (result.returncode, result.stdout.strip()) == (0, "outbox empty"), result.stderr
    finally:
        serve.close()


def test_candidates_without_a_runtime_directory(config_dir, monkeypatch):
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    config = config_dir.load()
    assert admin_client.socket_candidates(config) == [
        "/run/castghld/admin.sock",
        os.path.join(config.state.dir, "admin.sock"),
    ]


def test_a_file_at_the_socket_path_refuses_the_start(config_dir):
    path = config_dir.write()
    taken = os.path.join(config_dir.state_dir, "admin.sock")
    with open(taken, "w") as f:
        f.write("not a socket")
    command = [sys.executable, "-m", "castghld", "--config", path, "serve"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"admin socket {taken}: exists and is not a socket" in result.stderr
    assert "Traceback" not in result.stderr and "listening on" not in result.stderr
    with open(taken) as f:
        assert f.read() == "not a socket"


@pytest.mark.gen_test(timeout=60)
async def test_an_admin_request_over_a_sane_size_is_refused(serve):
    await serve.start()
    body = b"x" * 65536
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(os.path.join(serve.state_dir, "admin.sock"))
        client.sendall(
            b"POST /outbox/out:nope/drop HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        try:
            client.sendall(body)
        except OSError:
            pass  # the daemon may close before reading it all
        answer = client.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    result = serve.cli("outbox")  # the daemon serves on
    assert result.returncode == 0, result.stderr

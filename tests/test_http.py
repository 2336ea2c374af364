"""The HTTP skeleton: JSON errors for 404/405/413, /healthz, /metrics."""

from __future__ import annotations

import functools
import json
import socket

import pytest
import tornado.testing
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from castghld.app import LAG_PROBE_ENV, Daemon, StartupError
from castghld.fakes import wait_for


async def fetch(url, **kwargs):
    return await AsyncHTTPClient().fetch(url, raise_error=False, **kwargs)


def error_of(response) -> tuple[int, str]:
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.body)
    assert set(body) == {"error", "message"}
    return response.code, body["error"]


@pytest.fixture
def daemon(daemons):
    return daemons.start()


@pytest.mark.gen_test
async def test_healthz_ok_while_serving(daemon):
    response = await fetch(daemon.url + "/healthz")
    assert response.code == 200
    body = json.loads(response.body)
    assert body["status"] == "ok"
    assert body["installations"] == 0


@pytest.mark.gen_test
async def test_healthz_503_while_stopping(daemon):
    daemon.phase = "stopping"
    response = await fetch(daemon.url + "/healthz")
    assert response.code == 503
    assert json.loads(response.body)["status"] == "stopping"


@pytest.mark.gen_test
async def test_unknown_path_is_json_404(daemon):
    response = await fetch(daemon.url + "/nope")
    assert error_of(response) == (404, "not_found")


@pytest.mark.gen_test
async def test_post_to_unknown_path_is_json_404(daemon):
    response = await fetch(daemon.url + "/nope", method="POST", body=b"{}")
    assert error_of(response) == (404, "not_found")


@pytest.mark.gen_test
async def test_wrong_method_is_json_405(daemon):
    response = await fetch(daemon.url + "/healthz", method="DELETE")
    assert error_of(response) == (405, "method_not_allowed")


@pytest.mark.gen_test
async def test_body_over_one_mebibyte_is_json_413(daemon):
    response = await fetch(daemon.url + "/healthz", method="POST", body=b"x" * (1024 * 1024 + 1))
    assert error_of(response) == (413, "payload_too_large")


@pytest.mark.gen_test
async def test_chunked_body_over_limit_is_413(daemon):
    async def producer(write):
        for _ in range(17):
            await write(b"y" * 65536)

    # The curl client cannot stream a body: the simple client sends it chunked.
    client = SimpleAsyncHTTPClient(force_instance=True)
    try:
        request = HTTPRequest(
            daemon.url + "/api/ghl/v1/webhook/app",
            method="POST",
            body_producer=producer,
            headers={"Transfer-Encoding": "chunked"},
            request_timeout=10,
        )
        response = await client.fetch(request, raise_error=False)
    finally:
        client.close()
    assert error_of(response) == (413, "payload_too_large")


@pytest.mark.gen_test
async def test_metrics_are_prometheus_text(daemon):
    response = await fetch(daemon.url + "/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert b"# TYPE castghld_installations gauge" in response.body


@pytest.mark.gen_test
async def test_loop_lag_probe_only_when_asked(daemons, monkeypatch):
    for probe in ("", "1"):
        monkeypatch.setenv(LAG_PROBE_ENV, probe)
        daemon = Daemon(daemons.config_dir.load())
        await daemon.start([tornado.testing.bind_unused_port()[0]])
        try:
            if probe:
                lag_count = functools.partial(
                    daemon.metrics.registry.get_sample_value, "castghld_loop_lag_seconds_count"
                )
                await wait_for(lambda: (lag_count() or 0) >= 3)  # noqa: B023 (awaited here)
            response = await fetch(daemon.url + "/metrics")
            assert (b"castghld_loop_lag_seconds_bucket" in response.body) == bool(probe)
        finally:
            await daemon.stop()


@pytest.mark.gen_test
async def test_stop_refuses_new_connections(daemons, daemon):
    port = daemon.port
    await daemon.stop()
    daemons.running.remove(daemon)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.gen_test
async def test_second_daemon_on_the_same_state_dir_is_refused(daemons, daemon):
    second = Daemon(daemons.config_dir.load())
    with pytest.raises(StartupError) as info:
        await second.start()
    assert info.value.problems == [
        f"{daemons.config_dir.state_dir}: another castghld process is using this state directory"
    ]
    await second.stop()
    assert (await fetch(daemon.url + "/healthz")).code == 200


@pytest.mark.gen_test
async def test_client_gone_mid_body_does_not_hold_up_shutdown(daemon):
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.sendall(
        b"POST /api/ghl/v1/webhook/messages HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 1000\r\n\r\n" + b"{" * 10
    )
    await wait_for(lambda: daemon.requests.count == 1)
    sock.close()
    await wait_for(lambda: daemon.requests.count == 0)

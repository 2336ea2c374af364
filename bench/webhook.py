"""Webhook ack throughput: castghld's Delivery URL vs a bare Tornado handler, same run, same client.

castghld's path per request: Ed25519 signature check on the raw body, JSON validation, dedup, one
encrypted journal entry made durable by a group-committed fsync, JSON answer. The baseline reads
the body and answers the same JSON. Cast is held (fake, hung) so only the ack path is measured.

Run: .venv/bin/python bench/webhook.py [requests] [concurrency]
Prints requests/s and latency percentiles of both, and castghld / baseline ratios.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import statistics
import sys
import tempfile
import time

import tornado.httpserver
import tornado.testing
import tornado.web
import yaml
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from castghld.app import Daemon, configure_http_client
from castghld.config import load_config
from castghld.fakes import FakeCast, FakeGHL
from castghld.state import create_private_file, new_key_line


class Baseline(tornado.web.RequestHandler):
    def post(self) -> None:
        json.loads(self.request.body)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "accepted"}))


async def load(url: str, bodies: list[tuple[bytes, dict]], concurrency: int) -> list[float]:
    client = AsyncHTTPClient()
    latencies: list[float] = []
    queue = list(reversed(bodies))

    async def worker() -> None:
        while queue:
            body, headers = queue.pop()
            started = time.perf_counter()
            response = await client.fetch(
                HTTPRequest(url, method="POST", body=body, headers=headers), raise_error=False
            )
            if response.code != 200:
                raise SystemExit(f"{url}: HTTP {response.code} {response.body[:200]!r}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def report(name: str, latencies: list[float], seconds: float) -> float:
    ordered = sorted(latencies)
    rate = len(ordered) / seconds
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    print(f"  {name:<10} {rate:8.0f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
    return rate


async def start_castghld(directory: pathlib.Path, ghl: FakeGHL, cast: FakeCast) -> Daemon:
    key_path = directory / "state.key"
    create_private_file(str(key_path), (new_key_line() + "\n").encode())
    (directory / "state").mkdir(mode=0o700)
    (directory / "keys").mkdir()
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "public_url": "https://bench.invalid"},
        "ghl": {
            "client_id": "test-client",
            "client_secret": "test-secret",
            "api_base": ghl.url,
            "webhook_public_keys": ghl.write_public_keys(directory / "keys"),
        },
        "cast": {"api_key": "cast_test_key", "inbound_secret": "x", "api_base": cast.url},
        "state": {"dir": "state", "key_file": "state.key"},
        "logging": {"level": "warning"},
    }
    (directory / "castghld.yaml").write_text(yaml.safe_dump(config))
    daemon = Daemon(load_config(str(directory / "castghld.yaml")))
    sock, _ = tornado.testing.bind_unused_port()
    await daemon.start([sock])
    ghl.add_auth_code("bench-code", location_id="loc1")
    response = await AsyncHTTPClient().fetch(f"{daemon.url}/oauth/callback?code=bench-code")
    assert response.code == 200
    return daemon


async def main(requests: int, concurrency: int) -> None:
    logging.basicConfig(level=logging.ERROR)
    configure_http_client()
    ghl, cast = FakeGHL(), FakeCast()
    await ghl.start()
    await cast.start()
    cast.hang("send")
    app = tornado.web.Application([(r"/webhook", Baseline)])
    baseline_sock, baseline_port = tornado.testing.bind_unused_port()
    baseline_server = tornado.httpserver.HTTPServer(app)
    baseline_server.add_sockets([baseline_sock])
    with tempfile.TemporaryDirectory() as tmp:
        daemon = await start_castghld(pathlib.Path(tmp), ghl, cast)
        signed = []
        for n in range(requests):
            body = json.dumps(
                {
                    "locationId": "loc1",
                    "messageId": f"bench-{n}",
                    "contactId": "c1",
                    "type": "SMS",
                    "phone": "+639171234567",
                    "message": "Benchmark message " * 4,
                }
            ).encode()
            signed.append((body, {"Content-Type": "application/json", **ghl.sign(body)}))
        warmup = signed[: min(200, requests // 10)]
        await load(f"http://127.0.0.1:{baseline_port}/webhook", warmup, concurrency)
        print(f"{requests} webhooks, {concurrency} concurrent clients, one process, loopback")
        started = time.perf_counter()
        base = await load(f"http://127.0.0.1:{baseline_port}/webhook", signed, concurrency)
        base_rate = report("baseline", base, time.perf_counter() - started)
        started = time.perf_counter()
        ours = await load(daemon.url + "/api/ghl/v1/webhook/messages", signed, concurrency)
        our_rate = report("castghld", ours, time.perf_counter() - started)
        journal = daemon.outbox.journal
        print(
            f"castghld / baseline: throughput {our_rate / base_rate:.2f}x, "
            f"p50 latency {statistics.median(ours) / statistics.median(base):.2f}x; "
            f"{journal.entries_written} journal entries in {journal.fsyncs} fsyncs"
        )
        await daemon.stop()  # the held sends resume at a next start; this run just ends
    baseline_server.stop()
    await ghl.stop()
    await cast.stop()


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 2000,
            int(sys.argv[2]) if len(sys.argv) > 2 else 32,
        )
    )

"""The baseline of bench/run.py: a bare Tornado app that reads the JSON body and answers JSON.

Run by bench/run.py as its own process (the same way as the daemon), measured the same way.
Usage: python bench/bare.py PORT; python bench/bare.py PORT floor ED25519_PEM DIR: the same app
that also does the two things the contract makes every ack pay (SPEC §3): check the Ed25519
signature of the raw body and fsync the body to a file in DIR before answering (one fsync per
request, no group commit, on the default executor: the plainest correct handler); or
python bench/bare.py probe: an idle process with the daemon's
5 ms lag probe that prints {"samples", "max_ms", "over_20ms"} at SIGTERM. It is the control of the
daemon's loop-stall figures: what the machine's scheduling alone adds (other processes sharing
the cores).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import signal
import sys

import tornado.web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


class Baseline(tornado.web.RequestHandler):
    def post(self) -> None:
        json.loads(self.request.body)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "accepted"}))


async def probe() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    lags = []
    print("ready", flush=True)
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(0.005)
        lags.append(loop.time() - started - 0.005)
    over = sum(1 for lag in lags if lag > 0.02)
    print(json.dumps({"samples": len(lags), "max_ms": max(lags) * 1000, "over_20ms": over}))


class Floor(tornado.web.RequestHandler):
    def initialize(self, key: ed25519.Ed25519PublicKey, fd: int) -> None:
        self.key = key
        self.fd = fd

    async def post(self) -> None:
        try:
            self.key.verify(
                base64.b64decode(self.request.headers["X-GHL-Signature"]), self.request.body
            )
        except (KeyError, ValueError, InvalidSignature):
            raise tornado.web.HTTPError(401) from None
        json.loads(self.request.body)
        await asyncio.get_running_loop().run_in_executor(None, self.append, self.request.body)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "accepted"}))

    def append(self, body: bytes) -> None:
        os.write(self.fd, body + b"\n")
        os.fsync(self.fd)


def handler(floor: list[str]) -> tuple:
    if not floor:
        return (r"/api/ghl/v1/webhook/messages", Baseline)
    pem, directory = floor
    key = serialization.load_pem_public_key(pathlib.Path(pem).read_bytes())
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = os.open(os.path.join(directory, "floor.log"), flags, 0o600)
    return (r"/api/ghl/v1/webhook/messages", Floor, {"key": key, "fd": fd})


async def main(port: int, route: tuple) -> None:
    app = tornado.web.Application([route])
    app.listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if sys.argv[1] == "probe":
        asyncio.run(probe())
    else:
        floor = sys.argv[3:5] if sys.argv[2:3] == ["floor"] else []
        asyncio.run(main(int(sys.argv[1]), handler(floor)))

"""The baseline of bench/run.py: a bare Tornado app that reads the JSON body and answers JSON.

Run by bench/run.py as its own process (the same way as the daemon), measured the same way.
Usage: python bench/bare.py PORT, or python bench/bare.py probe: an idle process with the daemon's
5 ms lag probe that prints {"samples", "max_ms", "over_20ms"} at SIGTERM. It is the control of the
daemon's loop-stall figures: what the machine's scheduling alone adds (6 processes share 2 cores).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import tornado.web


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


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/api/ghl/v1/webhook/messages", Baseline)])
    app.listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(probe() if sys.argv[1] == "probe" else main(int(sys.argv[1])))

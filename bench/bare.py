"""The baseline of bench/run.py: a bare Tornado app that reads the JSON body and answers JSON.

Run by bench/run.py as its own process (the same way as the daemon), measured the same way.
Usage: python bench/bare.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import tornado.web


class Baseline(tornado.web.RequestHandler):
    def post(self) -> None:
        json.loads(self.request.body)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "accepted"}))


async def main(port: int) -> None:
    app = tornado.web.Application([(r"/api/ghl/v1/webhook/messages", Baseline)])
    app.listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))

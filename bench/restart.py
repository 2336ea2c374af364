"""Restart with a large backlog: memory and time of the outbox replay, and of `castghld serve`.

Run: .venv/bin/python bench/restart.py [waiting] [--serve] [--trace]   (default 100000)
Another revision: PYTHONPATH=<its checkout> .venv/bin/python bench/restart.py ...
Not part of the test suite.

1. Builds, in a temporary directory, an outbox journal of `waiting` unfinished outbound messages
   through the real `Outbox.add` (records from `outbound.new_record`, as the webhook handler makes
   them; GHL-sized ids, a 60-character text) in batches of 1,000 (one group commit each).
2. In a fresh process: RSS before and after `Outbox.load()`, the peak (VmHWM), replay seconds;
   with --trace, where the memory still held after the load was allocated (tracemalloc).
3. With --serve: `castghld serve` on that state (Cast and GHL unreachable: nothing is sent, the
   messages wait), seconds from spawn to `/healthz` 200, RSS then and 10 s later, VmHWM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

PYTHON = sys.executable
ROOT = pathlib.Path(__file__).resolve().parent.parent


def status_kb(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def build(directory: pathlib.Path, waiting: int) -> None:
    from castghld import outbound
    from castghld.metrics import Metrics
    from castghld.outbox import Outbox
    from castghld.state import KeyRing, new_key_line

    line = new_key_line()
    (directory / "key").write_text(line)
    keys = KeyRing([base64.urlsafe_b64decode(line.strip())])

    async def waits(outbox: Outbox, rid: str) -> None:
        return None  # the message stays unfinished, as with Cast down

    async def fill() -> None:
        outbox = Outbox(str(directory / "state"), keys, Metrics(), 30 * 86400.0)
        outbox.pipelines["outbound"] = waits
        outbox.load()
        await outbox.start()
        for start in range(0, waiting, 1000):
            records = []
            for n in range(start, min(start + 1000, waiting)):
                message_id = f"m{n:019d}"
                payload = {
                    "messageId": message_id,
                    "locationId": f"loc{n % 300:017d}",
                    "phone": f"+63917{n % 10_000_000:07d}",
                    "message": f"Campaign text number {n:08d} with a link https://ex.am/p",
                }
                records.append((outbound.record_id(message_id), outbound.new_record(payload)))
            await asyncio.gather(*(outbox.add(rid, record) for rid, record in records))
        await outbox.wait_idle()
        await outbox.stop()

    (directory / "state").mkdir(mode=0o700)
    asyncio.run(fill())


def measure_load(directory: str, trace: bool) -> None:
    """Child process: replay the journal, print JSON figures."""
    import gc
    import tracemalloc

    from castghld.metrics import Metrics
    from castghld.outbox import Outbox
    from castghld.state import KeyRing

    line = pathlib.Path(directory, "key").read_text()
    keys = KeyRing([base64.urlsafe_b64decode(line.strip())])
    if trace:
        tracemalloc.start(8)
    gc.collect()
    before = status_kb("self", "VmRSS")
    started = time.perf_counter()
    outbox = Outbox(os.path.join(directory, "state"), keys, Metrics(), 30 * 86400.0)
    outbox.load()
    seconds = time.perf_counter() - started
    after = status_kb("self", "VmRSS")
    gc.collect()
    figures = {
        "records": len(outbox.records),
        "replay_s": seconds,
        "rss_before_mb": before / 1024,
        "rss_after_mb": after / 1024,
        "rss_after_gc_mb": status_kb("self", "VmRSS") / 1024,
        "peak_mb": status_kb("self", "VmHWM") / 1024,
    }
    if trace:
        current, peak = tracemalloc.get_traced_memory()
        figures["traced_mb"], figures["traced_peak_mb"] = current / 1e6, peak / 1e6
        top = tracemalloc.take_snapshot().statistics("lineno")[:8]
        figures["top"] = [f"{s.size / 1e6:.1f} MB {s.traceback[0]}" for s in top]
    print(json.dumps(figures))


def measure_serve(directory: pathlib.Path) -> dict[str, float]:
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, dead = free_port(), free_port()
    os.chmod(directory / "key", 0o600)
    config = directory / "castghld.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {
                    "host": "127.0.0.1",
                    "port": port,
                    "public_url": f"http://127.0.0.1:{port}",
                },
                "state": {"dir": str(directory / "state"), "key_file": str(directory / "key")},
                "ghl": {
                    "client_id": "bench",
                    "client_secret": "bench-client-secret",
                    "api_base": f"http://127.0.0.1:{dead}",
                },
                "cast": {
                    "api_base": f"http://127.0.0.1:{dead}",
                    "api_key": "cast_test_bench",
                    "inbound_secret": "bench-inbound-secret-0123456789abcdef",
                },
                "logging": {"level": "warning"},
            }
        )
    )
    started = time.perf_counter()
    proc = subprocess.Popen(
        [PYTHON, "-m", "castghld", "--config", str(config), "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "serve.log", "ab"),
        cwd=directory,  # not the checkout: PYTHONPATH picks the castghld to measure
    )
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit((directory / "serve.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.02)
        ready = time.perf_counter() - started
        rss_ready = status_kb(proc.pid, "VmRSS") / 1024
        time.sleep(10)
        return {
            "ready_s": ready,
            "rss_ready_mb": rss_ready,
            "rss_10s_mb": status_kb(proc.pid, "VmRSS") / 1024,
            "peak_mb": status_kb(proc.pid, "VmHWM") / 1024,
        }
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        measure_load(sys.argv[2], "--trace" in sys.argv)
        return
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    waiting = int(args[0]) if args else 100_000
    with tempfile.TemporaryDirectory(prefix="castghld-restart-") as tmp:
        directory = pathlib.Path(tmp)
        started = time.perf_counter()
        build(directory, waiting)
        journal = directory / "state" / "outbox.log"
        print(
            f"built {waiting:,} waiting in {time.perf_counter() - started:.0f} s: journal "
            f"{journal.stat().st_size / 1e6:.1f} MB; load average {os.getloadavg()[0]:.2f}"
        )
        child = [PYTHON, __file__, "--child", tmp] + (["--trace"] if "--trace" in sys.argv else [])
        for _ in range(2):
            out = subprocess.run(child, check=True, capture_output=True, text=True, cwd=ROOT)
            figures = json.loads(out.stdout)
            top = figures.pop("top", None)
            print("load: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
            for line in top or ():
                print("   ", line)
        if "--serve" in sys.argv:
            figures = measure_serve(directory)
            print("serve: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()

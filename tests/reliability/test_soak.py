"""Soak (`pytest --soak` only): 100k messages through a `castghld serve` process; its resident
memory and open file descriptors are flat between the 20k-th and the 100k-th message.

"Flat" allows what the design keeps on purpose: every finished id is remembered for
`delivery.seen_retention` (8 bytes each once sealed: under 1 MB for 80k ids), plus allocator noise.
`CASTGHLD_SOAK_MESSAGES` shortens a run (the checkpoints stay at 20% and 100%).
"""

from __future__ import annotations

import os
import random

import pytest
from daemon_process import ServeProcess
from traffic import Clients, Workload, assert_sent_exactly_once

from castghld.fakes import wait_for

LOCATIONS = 20
RATE = 400
RSS_SLACK = 16 * 2**20  # bytes of growth allowed from 20% to 100% (seen ids + allocator noise)
FD_SLACK = 8


def rss_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def delivered(ghl) -> int:
    return sum(1 for reports in ghl.statuses.values() if reports[-1]["status"] == "delivered")


@pytest.mark.soak
@pytest.mark.gen_test(timeout=3600)
async def test_soak_100k_messages_rss_and_fds_flat(config_dir, fake_ghl, fake_cast):
    total = int(os.environ.get("CASTGHLD_SOAK_MESSAGES", 100_000))
    rng = random.Random(int(os.environ.get("CASTGHLD_STORM_SEED") or 1))
    workload = Workload(rng, LOCATIONS, total, 0, prefix="s")
    fake_cast.messages_per_second = RATE * 11 // 10  # jitter margin, see test_crash_storm
    fake_cast.requests_per_second = 4 * RATE * 11 // 10
    extra = {
        "cast": {"messages_per_second": RATE, "requests_per_second": 4 * RATE},
        "delivery": {"status_polls": [0.05]},
        "logging": {"level": "warning"},
    }
    serve = ServeProcess(config_dir, fake_ghl, fake_cast, extra=extra)
    clients = Clients(serve, workload, concurrency=16, rng=rng)
    samples = {}
    try:
        await serve.start()
        for n in range(LOCATIONS):
            await serve.install(workload.location(n))
        clients.start()
        items = [("out", m) for m in workload.outbound]
        done = 0
        for checkpoint in (total // 5, total):
            batch, done = items[done:checkpoint], checkpoint
            await clients.feed(batch, len(batch) / RATE)
            await clients.join(timeout=600)
            await wait_for(lambda n=checkpoint: delivered(fake_ghl) >= n, timeout=600)
            samples[checkpoint] = rss_and_fds(serve.proc.pid)
            rss, fds = samples[checkpoint]
            print(f"soak: {checkpoint} messages delivered: rss {rss >> 20} MiB, fds {fds}")
        assert await serve.terminate() == 0
    finally:
        await clients.close()
        serve.close()
    (rss_20, fds_20), (rss_100, fds_100) = samples[total // 5], samples[total]
    assert rss_100 - rss_20 <= RSS_SLACK, samples
    assert fds_100 - fds_20 <= FD_SLACK, samples
    assert_sent_exactly_once(fake_cast, workload, workload.outbound)
    assert fake_ghl.violations == [] and fake_cast.violations == []

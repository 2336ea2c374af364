"""Load for the reliability suite: many locations, outbound webhooks and inbound replies sent by
concurrent clients that resend until answered 2xx (as GHL and Cast do), and the end-to-end checks
that read only what the fakes recorded.
"""

from __future__ import annotations

import asyncio
import os
import random
import stat
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from conftest import BASE_CONFIG
from tornado.httpclient import HTTPClientError

INBOUND_ROUTE = "/conversations/messages/inbound"


@dataclass
class Workload:
    """`messages` outbound SMS and `replies` inbound replies over `locations` locations.

    Every message has its own recipient number and body, every reply its own sender, so a leak or a
    mix-up of one is traceable to it.
    """

    rng: random.Random
    locations: int
    messages: int
    replies: int
    prefix: str = "m"
    outbound: dict[str, dict] = field(default_factory=dict)
    inbound: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.add(self.prefix, self.messages, self.replies)

    def add(self, prefix: str, messages: int, replies: int) -> list[tuple[str, str]]:
        """More messages and replies (ids start with `prefix`); their ("out"|"in", id) items."""
        items = []
        for n in range(messages):
            message_id = f"{prefix}{n:06d}-{self.rng.getrandbits(32):08x}"
            items.append(("out", message_id))
            self.outbound[message_id] = {
                "contactId": f"contact-{n}",
                "locationId": self.location(self.rng.randrange(self.locations)),
                "messageId": message_id,
                "type": "SMS",
                "phone": f"+63917{self.rng.randrange(10**7):07d}",
                "message": f"body {message_id} {self.rng.getrandbits(48):012x}",
                "attachments": [],
                "userId": "user-1",
            }
        for n in range(replies):
            cast_id = f"CASTIN{prefix.upper()}{n:06d}"
            items.append(("in", cast_id))
            self.inbound[cast_id] = {
                "message_id": cast_id,
                "from": f"0918{self.rng.randrange(10**7):07d}",
                "to": self.inbound_number(self.rng.randrange(self.locations)),
                "message": f"reply {cast_id} {self.rng.getrandbits(48):012x}",
                "received_at": "2026-11-26T09:00:00Z",
            }
        self.rng.shuffle(items)
        return items

    @staticmethod
    def location(n: int) -> str:
        return f"loc{n:02d}"

    @staticmethod
    def inbound_number(n: int) -> str:
        return f"0917000{n:04d}"

    def cast_locations(self) -> dict:
        """`cast.locations` config routing each location's replies by its own number."""
        return {
            self.location(n): {"inbound_numbers": [self.inbound_number(n)]}
            for n in range(self.locations)
        }

    def location_of_reply(self, cast_id: str) -> str:
        return self.location(int(self.inbound[cast_id]["to"][-4:]))

    def phones(self) -> set[str]:
        numbers = {m["phone"] for m in self.outbound.values()}
        numbers |= {r["from"] for r in self.inbound.values()}
        return numbers

    def bodies(self) -> set[str]:
        texts = {m["message"] for m in self.outbound.values()}
        return texts | {r["message"] for r in self.inbound.values()}


class Clients:
    """Concurrent senders: each item is posted until the daemon answers it 2xx.

    A refused connection (the daemon is down), a timeout or a non-2xx answer puts the item back
    after a short random pause, as GHL's and Cast's retries do. ``acked`` holds every id answered
    2xx; ``answers`` counts every status seen (599: no answer).
    """

    def __init__(self, serve, workload: Workload, concurrency: int, rng: random.Random):
        self.serve = serve
        self.workload = workload
        self.concurrency = concurrency
        self.rng = rng
        self.queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.acked: set[str] = set()
        self.answers: Counter[int] = Counter()
        self.first_ack: dict[str, float] = {}
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(self.concurrency)]

    async def feed(self, items: list[tuple[str, str]], seconds: float) -> None:
        """Queue `items` (from `Workload.add`), evenly spread over `seconds`."""
        pause = seconds / max(1, len(items))
        started = time.monotonic()
        for n, item in enumerate(items):
            self.queue.put_nowait(item)
            delay = started + (n + 1) * pause - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def join(self, timeout: float) -> None:
        await asyncio.wait_for(self.queue.join(), timeout)

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            kind, item_id = await self.queue.get()
            try:  # put back before task_done: `join` must not see an empty queue meanwhile
                code = await self._post(kind, item_id)
                self.answers[code] += 1
                if 200 <= code < 300:
                    self.acked.add(item_id)
                    self.first_ack.setdefault(item_id, time.monotonic())
                else:
                    await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                    self.queue.put_nowait((kind, item_id))
            finally:
                self.queue.task_done()

    async def _post(self, kind: str, item_id: str) -> int:
        try:
            if kind == "out":
                response = await self.serve.ghl.post_webhook(
                    self.serve.url + "/api/ghl/v1/webhook/messages", self.workload.outbound[item_id]
                )
            else:
                response = await self.serve.post_inbound(self.workload.inbound[item_id])
        except (OSError, HTTPClientError):  # refused, reset or timed out: the daemon is down
            return 599
        return response.code


def sends_by_key(cast) -> Counter[str]:
    """Distinct SMS Cast sent, by idempotency key (replays of a key are not sends)."""
    return Counter(s["idempotency_key"] for s in cast.sent)


def assert_sent_exactly_once(cast, workload: Workload, acked: Iterable[str]) -> None:
    """Every acknowledged message is one real SMS with its own text and number; nothing else."""
    sent = sends_by_key(cast)
    twice = sorted(k for k, n in sent.items() if n > 1)
    assert not twice, f"{len(twice)} message(s) sent more than once: {twice[:5]}"
    missing = sorted(set(acked) - set(sent))
    assert not missing, f"{len(missing)} acknowledged message(s) never sent: {missing[:5]}"
    unknown = sorted(set(sent) - set(workload.outbound))
    assert not unknown, f"sent without a webhook: {unknown[:5]}"
    for record in cast.sent:
        expected = workload.outbound[record["idempotency_key"]]
        assert record["message"] == expected["message"], record["idempotency_key"]
        assert record["to"][-10:] == expected["phone"][-10:], record["idempotency_key"]


def final_statuses(ghl, message_ids: Iterable[str]) -> dict[str, list[str]]:
    return {m: [r["status"] for r in ghl.statuses.get(m, [])] for m in message_ids}


def assert_final_status(ghl, message_ids: Iterable[str], final: str = "delivered") -> None:
    """Each message's last status in GHL is `final`, and it never went backwards to another."""
    reports = final_statuses(ghl, message_ids)
    wrong = {m: s for m, s in reports.items() if s[-1:] != [final]}
    assert not wrong, f"{len(wrong)} message(s) without final {final!r}: {list(wrong.items())[:5]}"
    odd = {m: s for m, s in reports.items() if set(s) - {"pending", final}}
    assert not odd, f"unexpected statuses: {list(odd.items())[:5]}"


def assert_inbound_once(
    ghl,
    workload: Workload,
    acked: Iterable[str],
    kills: list[float],
    allowed: set[str] = frozenset(),
) -> None:
    """Every acknowledged reply is in GHL, in its location's conversation, once.

    A second copy is accepted only inside the documented window: the two posts came from different
    processes, a kill fence (see `Storm`) between them (the process died after GHL took the first
    and before it recorded the answer).
    """
    copies = Counter(m["altId"] for m in ghl.inbound_messages)
    missing = sorted(set(acked) - set(copies))
    assert not missing, f"{len(missing)} acknowledged reply(ies) never reached GHL: {missing[:5]}"
    for message in ghl.inbound_messages:
        reply = workload.inbound[message["altId"]]
        assert message["message"] == reply["message"]
        assert message["locationId"] == workload.location_of_reply(message["altId"])
    posts: dict[str, list[float]] = {}
    for call in ghl.calls_to("POST", INBOUND_ROUTE):
        if isinstance(call.json, dict):
            posts.setdefault(call.json.get("altId"), []).append(call.time)
    for alt_id, count in copies.items():
        if count > 1 and alt_id not in allowed:
            first, last = min(posts[alt_id]), max(posts[alt_id])
            explained = any(first < kill < last for kill in kills)
            assert explained, (
                f"reply {alt_id} reached GHL {count} times without a kill between its posts "
                f"(posts at {sorted(posts[alt_id])}, kills at {kills})"
            )


def national(number: str) -> str:
    """The digits that identify a PH mobile number in any form (+63..., 63..., 0...)."""
    return "".join(ch for ch in number if ch.isdigit())[-10:]


def audit_secrets(ghl) -> list[str]:
    """What must never show: every token fake GHL issued and the configured secrets."""
    configured = [
        BASE_CONFIG["ghl"]["client_secret"],
        BASE_CONFIG["cast"]["api_key"],
        BASE_CONFIG["cast"]["inbound_secret"],
    ]
    return ghl.issued_tokens + configured


def assert_no_leaks(serve, workload: Workload, secrets: Iterable[str]) -> None:
    """No secret, full phone number or message body in the daemon's log, in any /metrics scrape,
    or in the raw bytes of any file of its state directory (they are encrypted there)."""
    places = {"log": serve.log().encode(), "metrics": "\n".join(serve.scrapes).encode()}
    for entry in os.scandir(serve.state_dir):
        if not entry.is_file():  # the admin socket has no bytes to read
            continue
        with open(entry.path, "rb") as f:
            places[entry.name] = f.read()
    needles = {f"secret {n}": s for n, s in enumerate(secrets)}
    needles |= {f"phone {p}": national(p) for p in workload.phones()}
    needles |= {f"body {n}": b for n, b in enumerate(sorted(workload.bodies()))}
    found = [
        f"{what} in {where}"
        for where, data in places.items()
        for what, needle in needles.items()
        if needle.encode() in data
    ]
    assert not found, f"{len(found)} leak(s): {found[:10]}"


def assert_private(directory: str) -> None:
    """The state directory is 0700 and every file in it 0600 (temp files a kill left included:
    they show the mode a file had from birth)."""
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    modes = {e.name: stat.S_IMODE(e.stat().st_mode) for e in os.scandir(directory)}
    assert modes and all(mode == 0o600 for mode in modes.values()), modes

"""`castghld demo`: the whole round trip on loopback, no GHL or Cast account needed.

Starts the package's strict fake GHL and fake Cast (castghld.fakes) and a daemon wired to them in
a temporary directory, then: installs a location through the real OAuth callback, sends an SMS as
GHL's Delivery URL webhook, and replies to it as Cast's inbound callback. Prints each hop (what
GHL sent, what Cast received, what GHL was told), and the Cast account's balance before and after
the send (the demo account starts with `DEMO_CREDITS`; the send spends its parts). The demo key is
not a sandbox key (``cast_test_...``): the fake Cast's wallet charges it, as Cast charges a live
key. Exits 0 when every hop happened and neither fake saw a contract violation; removes the
directory in any case.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from typing import Any

from tornado.httpclient import AsyncHTTPClient

from castghld.config import Config, build_config
from castghld.fakes import FakeCast, FakeGHL
from castghld.state import create_private_file, new_key_line

LOCATION = "demo-location"
INBOUND_SECRET = "demo-inbound-secret"  # noqa: S105 (the fakes' demo value)
DEMO_CREDITS = 100  # the fake Cast account's wallet


def hop(arrow: str, what: str, detail: Any = None) -> None:
    print(f"{arrow:<18} {what}")
    if detail is not None:
        print("                   " + json.dumps(detail, ensure_ascii=False))


async def wait_until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo round trip did not complete in time")
        await asyncio.sleep(0.02)


def demo_config(directory: str, ghl: FakeGHL, cast: FakeCast) -> Config:
    """A config in `directory` (state key and state directory created) that points at the
    fakes."""
    key_file = f"{directory}/state.key"
    create_private_file(key_file, (new_key_line() + "\n").encode())
    raw = {
        "server": {"host": "127.0.0.1", "port": 0, "public_url": "https://demo.invalid"},
        "ghl": {
            "client_id": "demo-client",
            "client_secret": "demo-secret",
            "api_base": ghl.url,
            "webhook_public_keys": ghl.write_public_keys(directory),
        },
        "cast": {
            "api_base": cast.url,
            "api_key": "cast_demo_key",
            "inbound_secret": INBOUND_SECRET,
            "sender_id": "CASTDEMO",
        },
        "state": {"dir": f"{directory}/state", "key_file": key_file},
        "delivery": {"status_polls": [0.1, 0.2, 0.5]},
    }
    os.makedirs(raw["state"]["dir"], mode=0o700)
    return build_config(f"{directory}/castghld.yaml", raw)


async def install(daemon_url: str, ghl: FakeGHL) -> None:
    """The location installs the app through the OAuth callback."""
    ghl.add_auth_code("demo-code", location_id=LOCATION, company_id="demo-company")
    answer = await AsyncHTTPClient().fetch(
        f"{daemon_url}/oauth/callback?code=demo-code", raise_error=False
    )
    assert answer.code == 200, answer.body
    hop("GHL -> castghld", f"OAuth callback: HTTP {answer.code}, location {LOCATION} installed")


async def send_sms(daemon_url: str, ghl: FakeGHL, cast: FakeCast) -> None:
    """GHL's Delivery URL webhook, the Cast send, and the statuses reported back to GHL."""
    webhook = {
        "contactId": "demo-contact",
        "locationId": LOCATION,
        "messageId": "demo-msg-1",
        "type": "SMS",
        "phone": "+639171234567",
        "message": "Hello from the castghld demo",
        "attachments": [],
        "userId": "demo-user",
    }
    answer = await ghl.post_webhook(f"{daemon_url}/api/ghl/v1/webhook/messages", webhook)
    hop("GHL -> castghld", f"signed outbound webhook: HTTP {answer.code}", webhook)
    await wait_until(lambda: cast.sent)
    sent = cast.sent[0]
    hop(
        "castghld -> Cast",
        "POST /api/v1/sms/send",
        {k: sent.get(k) for k in ("to", "message", "sender_id", "idempotency_key")},
    )
    await wait_until(lambda: "delivered" in [s["status"] for s in ghl.statuses["demo-msg-1"]])
    for report in ghl.statuses["demo-msg-1"]:
        hop("castghld -> GHL", "PUT /conversations/messages/demo-msg-1/status", report)


async def show_balance(daemon: Any, when: str) -> None:
    """The account's balance as the daemon reads it (GET /api/v1/account/balance), exported as
    castghld_cast_credits."""
    account = daemon.cast.account_for(LOCATION)
    answer = await daemon.cast.account_info(account, "balance")
    daemon.credits.balances.record(account.name, answer["credits"])
    detail = {k: answer.get(k) for k in ("credits", "currency")}
    hop("castghld -> Cast", f"GET /api/v1/account/balance ({account.name}) {when}", detail)


async def receive_reply(daemon_url: str, ghl: FakeGHL, cast: FakeCast) -> None:
    """Cast's inbound callback with a reply, and its post into the GHL conversation."""
    reply = {
        "message_id": "CAST-DEMO-REPLY",
        "from": "09171234567",
        "to": "CASTDEMO",
        "message": "Got it, thanks!",
        "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    answer = await cast.post_inbound(
        f"{daemon_url}/api/cast/v1/webhook/inbound", INBOUND_SECRET, reply
    )
    hop("Cast -> castghld", f"inbound reply: HTTP {answer.code}", reply)
    await wait_until(lambda: ghl.inbound_messages)
    posted = ghl.inbound_messages[0]
    hop(
        "castghld -> GHL",
        "POST /conversations/messages/inbound",
        {k: posted.get(k) for k in ("type", "contactId", "message", "altId", "locationId")},
    )


async def round_trip(directory: str) -> int:
    from castghld.app import Daemon

    ghl = FakeGHL(client_id="demo-client", client_secret="demo-secret")  # noqa: S106
    cast = FakeCast(api_keys={"cast_demo_key": "demo-account"})
    cast.set_credits("demo-account", DEMO_CREDITS)
    cast.logs_enabled = True  # as Cast's v1 API: receipts are read from its logs by the page
    await ghl.start()
    await cast.start()
    daemon = Daemon(demo_config(directory, ghl, cast))
    await daemon.start()
    try:
        print(f"castghld demo: fake GHL {ghl.url}, fake Cast {cast.url}, daemon {daemon.url}")
        await install(daemon.url, ghl)
        await show_balance(daemon, "before the SMS")
        await send_sms(daemon.url, ghl, cast)
        await show_balance(daemon, "after the SMS")
        await receive_reply(daemon.url, ghl, cast)
        violations = ghl.violations + cast.violations
        if violations:
            print(f"castghld demo: contract violations: {violations}")
            return 1
        print("castghld demo: round trip complete (install, outbound SMS, inbound reply)")
        return 0
    finally:
        await daemon.stop()
        await ghl.stop()
        await cast.stop()


def run_demo() -> int:
    """Run the round trip in a temporary directory (removed afterwards); the exit code."""
    from castghld.app import configure_http_client

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_http_client()
    with tempfile.TemporaryDirectory(prefix="castghld-demo-") as directory:
        try:
            return asyncio.run(round_trip(directory))
        except (TimeoutError, AssertionError) as e:
            print(f"castghld demo: failed: {e}")
            return 1

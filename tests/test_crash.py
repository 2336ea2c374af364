"""What survives kill -9 and a full disk: the daemon runs as a real `castghld serve` process.

The fakes run in the test process; the daemon talks to them over loopback like production does.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource

import pytest
from daemon_process import ServeProcess

from castghld.fakes import wait_for

SEND = "/api/v1/sms/send"


@pytest.fixture
def serve(config_dir, fake_ghl, fake_cast):
    process = ServeProcess(config_dir, fake_ghl, fake_cast)
    yield process
    process.close()
    assert fake_ghl.violations == []
    assert fake_cast.violations == []


def statuses(ghl, message_id):
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


@pytest.mark.gen_test(timeout=60)
async def test_kill9_during_send_resends_with_same_key_and_reports(serve, fake_cast, fake_ghl):
    await serve.start()
    await serve.install("loc1")
    fake_cast.hang("send")
    response = await serve.post_message("m-crash")
    assert response.code == 200
    await wait_for(lambda: fake_cast.hung("send") == 1)
    serve.kill9()
    fake_cast.release("send")  # Cast now sends it: the daemon died before it could know
    await wait_for(lambda: len(fake_cast.sent) == 1)
    await serve.start()
    await wait_for(lambda: statuses(fake_ghl, "m-crash") == ["pending", "delivered"], timeout=20)
    sends = fake_cast.calls_to("POST", SEND)
    assert len(sends) == 2
    assert {call.headers["X-Idempotency-Key"] for call in sends} == {"m-crash"}
    assert len(fake_cast.sent) == 1
    assert fake_cast.replays == 1
    assert await serve.terminate() == 0


@pytest.mark.gen_test(timeout=60)
async def test_kill9_before_cast_answered_sends_after_restart(serve, fake_cast, fake_ghl):
    await serve.start()
    await serve.install("loc1")
    # The connection drops: the daemon backs off. Twice: libcurl sends a request again, at once,
    # when a kept-alive connection (warm from the balance read at start) dies before answering.
    fake_cast.fail_next("send", 599, times=2)
    response = await serve.post_message("m-wait")
    assert response.code == 200
    await wait_for(lambda: fake_cast.calls_to("POST", SEND))
    serve.kill9()
    assert fake_cast.sent == []
    await serve.start()
    await wait_for(lambda: statuses(fake_ghl, "m-wait") == ["pending", "delivered"], timeout=20)
    assert len(fake_cast.sent) == 1


@pytest.mark.gen_test(timeout=60)
async def test_kill9_before_ghl_answered_inbound_is_delivered_after_restart(
    serve, fake_cast, fake_ghl
):
    await serve.start()
    await serve.install("loc1")
    fake_ghl.hang("upsert")
    payload = {
        "message_id": "CASTIN1",
        "from": "09181234567",
        "to": "09171234567",
        "message": "yes please",
        "received_at": "2026-11-26T09:00:00Z",
    }
    response = await fake_cast.post_inbound(
        serve.url + "/api/cast/v1/webhook/inbound", "inbound-secret", payload
    )
    assert response.code == 200
    await wait_for(lambda: fake_ghl.hung("upsert") == 1)
    serve.kill9()
    fake_ghl.release("upsert")
    await serve.start()
    await wait_for(lambda: len(fake_ghl.inbound_messages) == 1, timeout=20)
    [message] = fake_ghl.inbound_messages
    assert message["altId"] == "CASTIN1"
    assert message["message"] == "yes please"


@pytest.mark.gen_test(timeout=90)
async def test_full_disk_answers_503_and_loses_nothing(config_dir, fake_ghl, fake_cast):
    serve = ServeProcess(config_dir, fake_ghl, fake_cast, log_to_file=False)
    try:
        await serve.start()
        await serve.install("loc1")
        fake_cast.hang("send")  # nothing progresses: only the webhooks write to the journal
        journal = config_dir.path / "state" / "outbox.log"
        limit = journal.stat().st_size + 4000
        # The file size limit makes every write past it fail (EFBIG), as a full disk does.
        resource.prlimit(serve.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        answers = {}
        for n in range(30):
            response = await serve.post_message(f"m{n}")
            answers[f"m{n}"] = response.code
            if response.code == 503:
                assert json.loads(response.body)["error"] == "store_failed"
        accepted = sorted(m for m, code in answers.items() if code == 200)
        refused = sorted(m for m, code in answers.items() if code == 503)
        assert accepted and refused, answers
        assert set(answers.values()) == {200, 503}
        assert os.path.getsize(journal) <= limit
        serve.kill9()
        fake_cast.release("send")
        await serve.start()  # a fresh process: no limit
        await wait_for(lambda: len(fake_cast.sent) == len(accepted), timeout=20)
        for message_id in refused:  # GHL retries what we refused
            assert (await serve.post_message(message_id)).code == 200
        await wait_for(lambda: len(fake_cast.sent) == 30, timeout=30)
        assert sorted(s["idempotency_key"] for s in fake_cast.sent) == sorted(answers)
        await wait_for(lambda: all(statuses(fake_ghl, m)[-1:] == ["delivered"] for m in answers))
    finally:
        serve.close()
    assert fake_ghl.violations == []
    assert fake_cast.violations == []


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_lets_a_send_in_flight_finish_and_records_it(serve, fake_cast, fake_ghl):
    await serve.start()
    await serve.install("loc1")
    fake_cast.latency = 1.0
    response = await serve.post_message("m-term")
    assert response.code == 200
    await wait_for(lambda: fake_cast.calls_to("POST", SEND))
    assert await serve.terminate() == 0
    assert len(fake_cast.sent) == 1
    fake_cast.latency = 0.0
    await serve.start()
    await wait_for(lambda: statuses(fake_ghl, "m-term") == ["pending", "delivered"], timeout=20)
    assert len(fake_cast.calls_to("POST", SEND)) == 1  # recorded as sent: not asked again


@pytest.mark.gen_test(timeout=60)
async def test_sigterm_during_a_burst_keeps_every_acknowledged_message(serve, fake_cast, fake_ghl):
    """The stop begins while webhooks are being written (batches queued for the journal's writer
    thread): it waits for them and exits 0; after the restart GHL's retry of every message
    answered 200 is a duplicate (stored), and none is sent twice."""
    await serve.start()
    await serve.install("loc1")
    posts = [asyncio.ensure_future(serve.post_message(f"m{n}")) for n in range(200)]
    await wait_for(lambda: sum(post.done() for post in posts) >= 10)
    assert await serve.terminate() == 0
    answers = await asyncio.gather(*posts, return_exceptions=True)
    acknowledged = [
        f"m{n}"
        for n, answer in enumerate(answers)
        if not isinstance(answer, BaseException) and answer.code == 200
    ]
    assert len(acknowledged) >= 10
    await serve.start()
    for message_id in acknowledged:
        response = await serve.post_message(message_id)
        assert json.loads(response.body)["status"] == "duplicate", message_id
    assert await serve.terminate() == 0
    keys = [s["idempotency_key"] for s in fake_cast.sent]
    assert len(keys) == len(set(keys))

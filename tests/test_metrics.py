"""Metrics that move: one round trip (install, outbound SMS, inbound reply, a refused webhook, a
reload) moves every declared castghld metric; labels carry no number or secret."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from castghld.fakes import wait_for
from tests.test_inbound import post, reply
from tests.test_outbound import statuses

# Families that only move on a failure this round trip does not provoke, each with the test that
# moves it.
FAILURE_ONLY = {
    "castghld_outbox_quarantined": "test_outbox.py (a damaged journal line)",
    "castghld_token_refreshes": "test_tokens.py (a refresh sweep)",
    "castghld_accept_paused": "reliability/test_hostile_descriptors.py (out of descriptors)",
    "castghld_cast_account_paused": "test_account_pause.py (a Cast account refusal)",
    "castghld_ghl_status_puts_saved": "test_receipt_sweep.py (final status before pending left)",
    # Zero once the outbox is empty, as after this round trip.
    "castghld_outbox_pending": "test_oldest_waiting_age_grows_while_cast_hangs",
    "castghld_outbox_oldest_age_seconds": "test_oldest_waiting_age_grows_while_cast_hangs",
    "castghld_cast_outages": "test_outbound_logs.py (test_cast_outage_logs_one_warning_...)",
    "castghld_outbound_dropped": "test_departed.py (a location leaves with texts queued)",
    "castghld_cast_credits_needed": "test_credits.py (messages waiting behind a hung send)",
    # 1 only for a postpaid account; the fake's accounts are topup.
    "castghld_cast_postpaid": "test_credits.py (a postpaid account)",
}


async def scrape(daemon) -> dict:
    response = await AsyncHTTPClient().fetch(daemon.url + "/metrics")
    text = response.body.decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


@pytest.mark.gen_test(timeout=30)
async def test_round_trip_moves_every_declared_metric(bridge):
    await bridge.start()
    await bridge.install("loc1")
    response = await bridge.post_message(phone="09171234567")
    assert response.code == 200
    await wait_for(lambda: statuses(bridge.ghl, "msg-1") == ["pending", "delivered"])
    assert (await post(bridge, reply())).code == 200
    await wait_for(lambda: len(bridge.ghl.inbound_messages) == 1)
    bad = await bridge.ghl.post_webhook(
        bridge.daemon.url + "/api/ghl/v1/webhook/messages",
        {"type": "SMS"},
        headers={"X-GHL-Signature": "bm90IGEgc2lnbmF0dXJl"},
    )
    assert bad.code == 401
    assert bridge.daemon.reload()
    families, text = await scrape(bridge.daemon)
    declared = [n for n in families if n.startswith("castghld_") and not n.endswith("_created")]
    still = []
    for name in declared:
        if name in FAILURE_ONLY:
            continue
        values = [s.value for s in families[name].samples if not s.name.endswith("_created")]
        if not any(v > 0 for v in values):
            still.append(name)
    assert still == []
    assert families["castghld_build_info"].samples[0].labels["version"]
    assert "process_resident_memory_bytes" in families or "process_start_time_seconds" in families
    assert 'castghld_upstream_requests_total{outcome="2xx",upstream="cast"}' in text
    assert 'castghld_inbound_messages_total{outcome="accepted",stage="received"} 1.0' in text
    assert 'castghld_inbound_messages_total{outcome="delivered",stage="delivery"} 1.0' in text
    assert "639171234567" not in text and "test-secret" not in text


@pytest.mark.gen_test(timeout=30)
async def test_cast_refusal_is_counted_by_its_error_code(bridge):
    await bridge.start()
    await bridge.install("loc1")
    bridge.cast.fail_next("send", 402)
    await bridge.post_message()
    await wait_for(lambda: "delivered" in statuses(bridge.ghl, "msg-1"))
    _, text = await scrape(bridge.daemon)
    assert (
        'castghld_upstream_requests_total{outcome="INSUFFICIENT_CREDITS",upstream="cast"}' in text
    )


@pytest.mark.gen_test(timeout=30)
async def test_oldest_waiting_age_grows_while_cast_hangs(bridge):
    await bridge.start()
    await bridge.install("loc1")
    bridge.cast.hang("send")
    await bridge.post_message()
    families, _ = await scrape(bridge.daemon)
    ages = {
        s.labels["kind"]: s.value for s in families["castghld_outbox_oldest_age_seconds"].samples
    }
    assert ages["inbound"] == 0
    await wait_for(lambda: time_passed(bridge.daemon))
    families, _ = await scrape(bridge.daemon)
    ages = {
        s.labels["kind"]: s.value for s in families["castghld_outbox_oldest_age_seconds"].samples
    }
    assert ages["outbound"] > 0
    pending = {s.labels["kind"]: s.value for s in families["castghld_outbox_pending"].samples}
    assert pending == {"outbound": 1, "inbound": 0}


def time_passed(daemon) -> bool:
    daemon._update_backlog_age()
    return daemon.metrics.oldest_waiting.labels("outbound")._value.get() > 0.05


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


@pytest.mark.gen_test(timeout=30)
async def test_unsigned_webhook_is_counted_apart_from_a_wrong_signature(bridge):
    await bridge.start()
    url = bridge.daemon.url + "/api/ghl/v1/webhook/messages"
    _, text = await scrape(bridge.daemon)
    webhooks = "castghld_webhooks_total"
    assert sample(text, webhooks, kind="messages", outcome="unsigned") == 0
    assert sample(text, webhooks, kind="messages", outcome="bad_signature") == 0
    junk = await AsyncHTTPClient().fetch(url, method="POST", body="{}", raise_error=False)
    assert junk.code == 401
    _, text = await scrape(bridge.daemon)
    assert sample(text, webhooks, kind="messages", outcome="unsigned") == 1
    assert sample(text, webhooks, kind="messages", outcome="bad_signature") == 0
    wrong = await bridge.ghl.post_webhook(
        url, {"type": "SMS"}, headers={"X-GHL-Signature": "bm90IGEgc2lnbmF0dXJl"}
    )
    assert wrong.code == 401
    _, text = await scrape(bridge.daemon)
    assert sample(text, webhooks, kind="messages", outcome="unsigned") == 1
    assert sample(text, webhooks, kind="messages", outcome="bad_signature") == 1


@pytest.mark.gen_test(timeout=30)
async def test_counters_are_exported_at_zero_before_the_first_event(bridge):
    await bridge.start()
    _, text = await scrape(bridge.daemon)
    assert sample(text, "castghld_config_reloads_total", outcome="rejected") == 0
    assert sample(text, "castghld_config_reloads_total", outcome="applied") == 0
    for code in ("INVALID_API_KEY", "API_KEY_REVOKED", "INSUFFICIENT_CREDITS"):
        assert sample(text, "castghld_upstream_requests_total", upstream="cast", outcome=code) == 0
    for outcome in ("sent", "retry", "failed", "gave_up", "rejected"):
        assert sample(text, "castghld_cast_sends_total", outcome=outcome) == 0
    assert sample(text, "castghld_ghl_status_reports_total", status="report_failed") == 0
    assert sample(text, "castghld_config_last_reload_successful") == 1

"""config/alerts.yml: example Prometheus rules that load, fire on the sample series of
tests/alerts_test.yml (promtool, where installed) and name only metrics and label values a running
castghld exports from its start."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient

from castghld.fakes import wait_for

ALERTS = os.path.join(os.path.dirname(__file__), "..", "config", "alerts.yml")
ALERT_TESTS = os.path.join(os.path.dirname(__file__), "alerts_test.yml")
# Every promtool unit-test file of the rules (alerts_credits_test.yml: the Cast account group).
ALERT_TEST_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "alerts*_test.yml")))
# `metric{label="v", other=~"a|b"}` in a PromQL expression.
SELECTOR_RE = re.compile(r"\b(castghld_[a-z_]+)(?:\{([^}]*)\})?")
# Labels Prometheus adds from the scrape config, not the exporter.
TARGET_LABELS = {"job", "instance"}
MATCHER_RE = re.compile(r'(\w+)\s*(=~|=|!=|!~)\s*"([^"]*)"')


def rules() -> list[dict]:
    with open(ALERTS) as f:
        doc = yaml.safe_load(f)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_rules_have_the_prometheus_rule_shape():
    with open(ALERTS) as f:
        doc = yaml.safe_load(f)
    assert set(doc) == {"groups"}
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["expr"].count("(") == rule["expr"].count(")")


def test_rules_cover_the_issue_cases():
    exprs = " ".join(rule["expr"] for rule in rules())
    for needle in (
        'status="needs_reauth"',
        "castghld_outbox_oldest_age_seconds",
        "INVALID_API_KEY",
        "INSUFFICIENT_CREDITS",
        'status="report_failed"',
        'outcome="bad_signature"',
    ):
        assert needle in exprs


async def exported_samples(bridge) -> dict[str, list[dict[str, str]]]:
    """{sample name: [label sets]} of a daemon's /metrics right after its start, before any
    request or event: what Prometheus sees from the first scrape."""
    daemon = await bridge.start()
    # The start reads each Cast account's balance: until Cast answers, its credits are unknown,
    # and no series is more honest than a made-up 0. Every other series is there at once.
    await wait_for(lambda: daemon.credits.balances.balances, timeout=10)
    response = await AsyncHTTPClient().fetch(daemon.url + "/metrics")
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    return samples


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, operator, value)]) of every castghld selector in `expr`."""
    return [
        (name, MATCHER_RE.findall(matchers or "")) for name, matchers in SELECTOR_RE.findall(expr)
    ]


def unexported(expr: str, samples: dict[str, list[dict[str, str]]]) -> list[str]:
    """The selectors of `expr` that a freshly started daemon exports no sample for: an unknown
    metric, or a label value (each alternative of a `=~` regex) with no series yet."""
    missing = []
    for name, matchers in selectors(expr):
        if name not in samples:
            missing.append(name)
            continue
        for label, op, value in matchers:
            if label in TARGET_LABELS:
                continue
            wanted = value.split("|") if op == "=~" else [value] if op == "=" else []
            for one in wanted:
                if not any(labels.get(label) == one for labels in samples[name]):
                    missing.append(f'{name}{{{label}="{one}"}}')
    return missing


@pytest.mark.gen_test(timeout=30)
async def test_rules_name_only_exported_metrics(bridge):
    samples = await exported_samples(bridge)
    for rule in rules():
        assert selectors(rule["expr"]) or "up{" in rule["expr"], rule["alert"]
        for name, _ in selectors(rule["expr"]):
            assert name in samples, (rule["alert"], name)


@pytest.mark.gen_test(timeout=30)
async def test_every_series_an_alert_selects_exists_at_zero_from_the_start(bridge):
    """A counter series that first appears at 1 has not increased as far as `increase()` knows:
    a single rejected reload or refused key would never fire."""
    samples = await exported_samples(bridge)
    for rule in rules():
        assert unexported(rule["expr"], samples) == [], rule["alert"]


def test_webhook_signature_alert_counts_wrong_signatures_not_unsigned_requests():
    (rule,) = [r for r in rules() if r["alert"] == "CastghldWebhookSignatureFailures"]
    assert 'outcome="bad_signature"' in rule["expr"]
    assert 'outcome!="unsigned"' in rule["expr"]


def test_rules_include_target_gone_and_cast_unavailable():
    by_name = {rule["alert"]: rule["expr"] for rule in rules()}
    assert by_name["CastghldTargetMissing"].strip() == 'absent(up{job="castghld"})'
    assert "no_answer" in by_name["CastghldCastUnavailable"]
    assert "SERVICE_UNAVAILABLE" in by_name["CastghldCastUnavailable"]


def test_every_rule_has_a_promtool_unit_test():
    cases = []
    for path in ALERT_TEST_FILES:
        with open(path) as f:
            doc = yaml.safe_load(f)
        cases += [case for group in doc["tests"] for case in group["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    names = {rule["alert"] for rule in rules()}
    assert firing == names, "each rule fires on some sample series"
    assert silent == names, "each rule stays silent on some series that must not fire it"


PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not installed (Debian: apt-get install --no-install-recommends prometheus)"


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_accepts_the_rules():
    result = subprocess.run(
        ["promtool", "check", "rules", ALERTS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_unit_tests_of_the_rules_pass():
    """Each rule fires on the sample series that should fire it and stays silent on junk."""
    result = subprocess.run(
        ["promtool", "test", "rules", *ALERT_TEST_FILES],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

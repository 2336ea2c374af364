"""config/alerts.yml: example Prometheus rules that load and name only metrics castghld exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import generate_latest

from castghld.metrics import Metrics

ALERTS = os.path.join(os.path.dirname(__file__), "..", "config", "alerts.yml")


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


def test_rules_name_only_exported_metrics():
    metrics = Metrics()
    exported = {
        line.split()[2]
        for line in generate_latest(metrics.registry).decode().splitlines()
        if line.startswith("# TYPE")
    }
    exported |= {name + "_total" for name in exported}
    for rule in rules():
        for name in re.findall(r"\bcastghld_[a-z_]+", rule["expr"]):
            assert name in exported, (rule["alert"], name)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rules():
    result = subprocess.run(
        ["promtool", "check", "rules", ALERTS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr

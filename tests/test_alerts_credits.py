"""config/alerts.yml, group castghld-cast-credits: the Cast-credit rules fire on the series
castghld exports (promtool unit tests in tests/alerts_credits_test.yml)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

HERE = os.path.dirname(__file__)
ALERTS = os.path.join(HERE, "..", "config", "alerts.yml")
ALERT_TESTS = os.path.join(HERE, "alerts_credits_test.yml")
GROUP = "castghld-cast-credits"


def group_rules() -> list[dict]:
    with open(ALERTS) as f:
        doc = yaml.safe_load(f)
    [group] = [g for g in doc["groups"] if g["name"] == GROUP]
    return group["rules"]


def test_every_credit_rule_fires_and_stays_silent_in_a_promtool_test():
    with open(ALERT_TESTS) as f:
        doc = yaml.safe_load(f)
    cases = [case for test in doc["tests"] for case in test["alert_rule_test"]]
    names = {rule["alert"] for rule in group_rules()}
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == names
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == names


def test_the_below_alerts_leave_postpaid_accounts_out():
    for rule in group_rules():
        if "castghld_cast_credits <" in rule["expr"]:
            assert "castghld_cast_credits >= 0" in rule["expr"]
            assert "unless castghld_cast_postpaid == 1" in rule["expr"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_unit_tests_of_the_credit_rules_pass():
    result = subprocess.run(
        ["promtool", "test", "rules", ALERT_TESTS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr

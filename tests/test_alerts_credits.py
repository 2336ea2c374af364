"""config/alerts.yml, group castghld-cast-credits: the Cast-credit rules fire on the series
castghld exports (promtool unit tests in tests/alerts_credits_test.yml)."""

from __future__ import annotations

import asyncio
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


ACCOUNT_METRICS = (
    "castghld_cast_account_paused",
    "castghld_cast_credits",
    "castghld_cast_credits_needed",
    "castghld_cast_postpaid",
    "castghld_cast_parts_charged_total",
)


def series_of(metrics_text: str) -> list[dict[str, str]]:
    """promtool input series holding each Cast-account sample of a /metrics answer, constant."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in ACCOUNT_METRICS:
                labels = ",".join(
                    f'{k}="{v}"' for k, v in {"job": "castghld", **sample.labels}.items()
                )
                out.append(
                    {"series": f"{sample.name}{{{labels}}}", "values": f"{sample.value:g}x10"}
                )
    return out


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.gen_test(timeout=60)
async def test_the_daemons_own_metrics_fire_the_account_alerts(bridge, tmp_path):
    from tornado.httpclient import AsyncHTTPClient

    from castghld.fakes import wait_for

    bridge.cast.set_credits("acct", 2)  # two parts: the third and fourth messages cannot go
    daemon = await bridge.start()
    await bridge.install("loc1")
    account = daemon.cast.account_for("loc1")
    for n in range(4):
        await bridge.post_message(messageId=f"m{n}", message="hi")
    await wait_for(lambda: daemon.outbound.accounts.paused, timeout=10)
    await wait_for(lambda: daemon.credits.waiting.needed(account.name) == 2)
    assert await daemon.credits.balances.read(account) == 0
    text = (await AsyncHTTPClient().fetch(daemon.url + "/metrics")).body.decode()
    name = account.name
    tests = {
        "rule_files": [os.path.abspath(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series_of(text),
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "CastghldCastAccountPaused",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "job": "castghld",
                                    "account": name,
                                    "reason": "INSUFFICIENT_CREDITS",
                                },
                                "exp_annotations": {
                                    "summary": f"Cast account {name} is paused "
                                    "(INSUFFICIENT_CREDITS): its messages wait",
                                    "description": "castghld accounts names the reason and the "
                                    "fix; messages fail at delivery.send_deadline unless it is "
                                    "fixed",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "CastghldCastCreditsBelowWaiting",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "castghld",
                                    "account": name,
                                },
                                "exp_annotations": {
                                    "summary": f"Cast account {name} has 0 credits, fewer than "
                                    "its waiting messages need",
                                    "description": "top up the Cast account; castghld_cast_"
                                    f'credits_needed{{account="{name}"}} shows the parts waiting',
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "daemon_alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    proc = await asyncio.create_subprocess_exec(
        "promtool",
        "test",
        "rules",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode() + text

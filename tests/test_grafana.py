"""config/grafana/castghld.json: a Grafana dashboard whose every query names metrics (and label
values) a freshly started castghld exports, with a panel for each thing an operator watches."""

from __future__ import annotations

import json
import os

import pytest

from tests.test_alerts import exported_samples, selectors, unexported

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "config", "grafana", "castghld.json")


def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel["targets"]
    ]


def test_dashboard_has_a_panel_for_each_thing_an_operator_watches():
    text = " ".join(expr for _, expr in queries())
    for metric in (
        "castghld_outbox_pending",
        "castghld_outbox_oldest_age_seconds",
        "castghld_cast_sends_total",
        "castghld_ghl_status_reports_total",
        "castghld_upstream_requests_total",
        "castghld_upstream_request_seconds_bucket",
        "castghld_installations",
        "castghld_config_reloads_total",
        "castghld_config_last_reload_successful",
        "castghld_cast_credits",
    ):
        assert metric in text, metric
    assert len({panel["id"] for panel in dashboard()["panels"]}) == len(dashboard()["panels"])


@pytest.mark.gen_test(timeout=30)
async def test_every_dashboard_query_names_an_exported_metric(bridge):
    samples = await exported_samples(bridge)
    for title, expr in queries():
        assert selectors(expr), title
        assert unexported(expr, samples) == [], title

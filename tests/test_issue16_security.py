"""Secrets and abuse at the edges: what a hostile upstream answer or a flood of junk install
callbacks can make castghld print, count or refuse."""

from __future__ import annotations

import pytest

from castghld.fakes import wait_for
from tests.test_metrics import scrape
from tests.test_outbound import ready, statuses

# -- Cast's error_code as a metric label -------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_an_undocumented_cast_error_code_is_counted_as_other(bridge):
    await ready(bridge)
    hostile = ["NOT_IN_THE_SPEC", "X" * 39, "PWNED_1", "PWNED_2"]
    for n, code in enumerate(hostile):
        bridge.cast.fail_next("send", 400, {"success": False, "error": "no", "error_code": code})
        await bridge.post_message(messageId=f"m{n}")
        await wait_for(lambda n=n: statuses(bridge.ghl, f"m{n}") == ["failed"])
    _, text = await scrape(bridge.daemon)
    for code in hostile:
        assert code not in text
    assert 'castghld_upstream_requests_total{outcome="other",upstream="cast"} 4.0' in text

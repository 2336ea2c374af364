"""Secrets and abuse at the edges: what a hostile upstream answer or a flood of junk install
callbacks can make castghld print, count or refuse."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from tornado.httpclient import AsyncHTTPClient

from castghld.fakes import wait_for
from castghld.oauth import build_install_url
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


# -- the install URL's scopes --------------------------------------------------------------------

# What GHL's OpenAPI documents (ghl-openapi-oauth/-contacts/-conversations.json) as the scope of
# each GHL call castghld makes with a token the install gave it.
SCOPE_OF_CALL = {
    "POST /oauth/locationToken (agency installs mint location tokens)": "oauth.write",
    "GET /oauth/installedLocations (reconciliation)": "oauth.readonly",
    "POST /contacts/upsert (inbound replies)": "contacts.write",
    "POST /conversations/messages/inbound (inbound replies)": "conversations/message.write",
    "PUT /conversations/messages/{id}/status (delivery reports)": "conversations/message.write",
}


def scopes_of(url: str) -> list[str]:
    return parse_qs(urlsplit(url).query)["scope"][0].split(" ")


@pytest.mark.gen_test
async def test_install_url_asks_for_the_scope_of_every_call_castghld_makes(bridge, config_dir):
    daemon = await bridge.start()
    redirect = await AsyncHTTPClient().fetch(
        daemon.url + "/oauth/install", follow_redirects=False, raise_error=False
    )
    assert redirect.code == 302
    asked = scopes_of(redirect.headers["Location"])
    missing = {call: scope for call, scope in SCOPE_OF_CALL.items() if scope not in asked}
    assert missing == {}
    assert len(asked) == len(set(asked))
    # `castghld install-url` builds the same URL.
    assert scopes_of(build_install_url(config_dir.load())) == asked

"""The OAuth install (both routes, agency installs) and GHL's app webhooks, against the fake GHL."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from castghld.cli import main
from castghld.oauth import STATE_LIFETIME, make_state, verify_state
from castghld.state import KeyRing, StateStore

APP_WEBHOOK = "/api/ghl/v1/webhook/app"
SCOPES = [
    "conversations/message.write",
    "conversations/message.readonly",
    "conversations.write",
    "conversations.readonly",
    "contacts.readonly",
    "contacts.write",
    "oauth.write",
    "oauth.readonly",
]


async def fetch(url: str, **kwargs):
    return await AsyncHTTPClient().fetch(url, raise_error=False, follow_redirects=False, **kwargs)


async def callback(bridge, **query: str):
    return await fetch(f"{bridge.daemon.url}/oauth/callback?{urlencode(query)}")


def stored_on_disk(config_dir, section: str, key: str):
    """The record as a fresh reader of the state file sees it (what survives a crash)."""
    store = StateStore(config_dir.state_dir, KeyRing.load(config_dir.key_path))
    try:
        store.load()
        return store.get(section, key)
    finally:
        store.close()


def iso_timestamp(seconds_ago: float = 0.0) -> str:
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def app_event(kind: str, location_id: str = "", company_id: str = "comp1", **extra) -> dict:
    """An app webhook body shaped like GHL's (INSTALL / UNINSTALL)."""
    event = {
        "type": kind,
        "appId": "test",
        "companyId": company_id,
        "timestamp": iso_timestamp(),
        "webhookId": str(uuid.uuid4()),
    }
    if location_id:
        event["locationId"] = location_id
    event.update(extra)
    return event


async def post_app_webhook(bridge, event: dict, alg: str = "ed25519", headers=None):
    return await bridge.ghl.post_webhook(bridge.daemon.url + APP_WEBHOOK, event, alg, headers)


def token_calls(fake_ghl, grant_type: str):
    return [
        c for c in fake_ghl.calls_to("POST", "/oauth/token") if c.form["grant_type"] == grant_type
    ]


async def status_update_succeeds(bridge, location_id: str, message_id: str) -> None:
    """Use the location's stored token on a real GHL route (the fake checks whose token it is)."""
    await bridge.update_status(location_id, message_id)
    assert bridge.ghl.statuses[message_id] == [{"status": "delivered"}]


# -- GET /oauth/install and castghld install-url -------------------------------------------------


@pytest.mark.gen_test
async def test_install_redirects_to_chooselocation_with_signed_state(bridge):
    daemon = await bridge.start()
    response = await fetch(daemon.url + "/oauth/install")
    assert response.code == 302
    url = urlsplit(response.headers["Location"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == (
        "https://marketplace.gohighlevel.com/v2/oauth/chooselocation"
    )
    query = parse_qs(url.query)
    assert query["response_type"] == ["code"]
    assert query["client_id"] == ["test-client"]
    assert query["redirect_uri"] == ["https://ghl.example.ph/oauth/callback"]
    assert query["scope"][0].split() == SCOPES
    assert verify_state(daemon.config, query["state"][0]) is None


@pytest.mark.gen_test
async def test_install_url_follows_the_configured_auth_base(bridge):
    auth_base = "https://marketplace.leadconnectorhq.com"
    daemon = await bridge.start({"ghl": {"auth_base": auth_base}})
    response = await fetch(daemon.url + "/oauth/install")
    assert response.headers["Location"].startswith(auth_base + "/v2/oauth/chooselocation?")


@pytest.mark.gen_test
async def test_install_url_command_state_is_accepted_by_the_callback(bridge, config_dir, capsys):
    await bridge.start()
    assert main(["--config", config_dir.config_path, "install-url"]) == 0
    state = parse_qs(urlsplit(capsys.readouterr().out.strip()).query)["state"][0]
    bridge.ghl.add_auth_code("code-1", location_id="loc1")
    response = await callback(bridge, code="code-1", state=state)
    assert response.code == 200, response.body
    assert bridge.daemon.installations.get("loc1")["status"] == "ok"


# -- GET /oauth/callback -------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_callback_from_install_link_stores_tokens(bridge):
    daemon = await bridge.start()
    redirect = await fetch(daemon.url + "/oauth/install")
    state = parse_qs(urlsplit(redirect.headers["Location"]).query)["state"][0]
    bridge.ghl.add_auth_code(
        "code-1", location_id="loc1", redirect_uri="https://ghl.example.ph/oauth/callback"
    )
    response = await callback(bridge, code="code-1", state=state)
    assert response.code == 200, response.body
    assert response.headers["Content-Type"].startswith("text/html")
    assert b"loc1" in response.body
    record = daemon.installations.get("loc1")
    assert record["status"] == "ok"
    assert record["company_id"] == "comp1"
    (exchange,) = token_calls(bridge.ghl, "authorization_code")
    assert exchange.form["user_type"] == "Location"
    assert exchange.form["redirect_uri"] == "https://ghl.example.ph/oauth/callback"
    await status_update_succeeds(bridge, "loc1", "msg-1")


@pytest.mark.gen_test
async def test_marketplace_callback_without_state_installs(bridge):
    await bridge.start()
    bridge.ghl.add_auth_code("code-1", location_id="loc1")
    response = await callback(bridge, code="code-1")
    assert response.code == 200, response.body
    await status_update_succeeds(bridge, "loc1", "msg-1")


@pytest.mark.gen_test
async def test_callback_stores_the_pair_on_disk_before_answering(bridge, config_dir):
    await bridge.start()
    bridge.ghl.add_auth_code("code-1", location_id="loc1")
    response = await callback(bridge, code="code-1")
    assert response.code == 200, response.body
    on_disk = stored_on_disk(config_dir, "installs", "loc1")
    assert on_disk == bridge.daemon.installations.get("loc1")
    assert on_disk["access_token"] and on_disk["refresh_token"]


@pytest.mark.gen_test
async def test_callback_with_forged_state_is_400_and_exchanges_nothing(bridge):
    await bridge.start()
    bridge.ghl.add_auth_code("code-1", location_id="loc1")
    response = await callback(bridge, code="code-1", state="9999999999.abc.forged")
    assert response.code == 400
    assert b"state parameter is invalid" in response.body
    assert token_calls(bridge.ghl, "authorization_code") == []
    assert bridge.daemon.installations.get("loc1") is None


@pytest.mark.gen_test
async def test_callback_with_expired_state_is_400(bridge):
    daemon = await bridge.start()
    state = make_state(daemon.config, now=time.time() - STATE_LIFETIME - 1)
    bridge.ghl.add_auth_code("code-1", location_id="loc1")
    response = await callback(bridge, code="code-1", state=state)
    assert response.code == 400
    assert b"expired" in response.body
    assert daemon.installations.get("loc1") is None


@pytest.mark.gen_test
async def test_callback_without_code_is_400(bridge):
    await bridge.start()
    response = await fetch(bridge.daemon.url + "/oauth/callback")
    assert response.code == 400
    assert b"no authorisation code" in response.body
    assert bridge.ghl.calls == []


@pytest.mark.gen_test
async def test_callback_with_code_ghl_rejects_is_400_with_ghl_reason(bridge, config_dir):
    await bridge.start()
    response = await callback(bridge, code="never-issued")
    assert response.code == 400
    assert b"authorization code is invalid" in response.body
    assert bridge.daemon.installations.location_ids() == []
    assert stored_on_disk(config_dir, "installs", "never-issued") is None


@pytest.mark.gen_test
async def test_spent_code_is_400_and_keeps_the_first_install(bridge):
    await bridge.start()
    bridge.ghl.add_auth_code("code-1", location_id="loc1")
    assert (await callback(bridge, code="code-1")).code == 200
    first = bridge.daemon.installations.get("loc1")
    response = await callback(bridge, code="code-1")
    assert response.code == 400
    assert bridge.daemon.installations.get("loc1") == first


@pytest.mark.parametrize("status", [500, 503, 599])
@pytest.mark.gen_test
async def test_callback_when_ghl_fails_is_502_not_500(bridge, status):
    await bridge.start()
    bridge.ghl.add_auth_code("code-1", location_id="loc1")
    bridge.ghl.fail_next("token", status)
    response = await callback(bridge, code="code-1")
    assert response.code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert b"Traceback" not in response.body
    assert bridge.daemon.installations.get("loc1") is None


@pytest.mark.gen_test
async def test_reinstall_replaces_the_tokens(bridge):
    await bridge.start()
    await bridge.install("loc1")
    first = bridge.daemon.installations.get("loc1")
    bridge.ghl.add_auth_code("code-again", location_id="loc1")
    assert (await callback(bridge, code="code-again")).code == 200
    second = bridge.daemon.installations.get("loc1")
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    await status_update_succeeds(bridge, "loc1", "msg-1")


@pytest.mark.gen_test
async def test_callback_page_escapes_the_location_id(bridge):
    await bridge.start()
    bridge.ghl.add_auth_code("code-1", location_id="<script>x</script>")
    response = await callback(bridge, code="code-1")
    assert response.code == 200
    assert b"<script>" not in response.body
    assert b"&lt;script&gt;x&lt;/script&gt;" in response.body


# -- agency (bulk) installs ----------------------------------------------------------------------


async def agency_install(bridge, locations: list[str], company_id: str = "agency1"):
    bridge.ghl.add_auth_code(
        "agency-code", company_id=company_id, user_type="Company", approved_locations=locations
    )
    return await callback(bridge, code="agency-code")


@pytest.mark.gen_test
async def test_agency_install_mints_a_token_for_each_approved_location(bridge, config_dir):
    await bridge.start()
    response = await agency_install(bridge, ["locA", "locB"])
    assert response.code == 200, response.body
    assert b"locA" in response.body and b"locB" in response.body
    installations = bridge.daemon.installations
    assert sorted(installations.location_ids()) == ["locA", "locB"]
    for location_id in ("locA", "locB"):
        assert installations.get(location_id)["company_id"] == "agency1"
        assert stored_on_disk(config_dir, "installs", location_id) == installations.get(location_id)
    assert stored_on_disk(config_dir, "companies", "agency1")["refresh_token"]
    mints = bridge.ghl.calls_to("POST", "/oauth/locationToken")
    assert sorted(c.form["locationId"] for c in mints) == ["locA", "locB"]
    assert {c.headers["Version"] for c in mints} == {"2021-07-28"}
    await status_update_succeeds(bridge, "locA", "msg-a")
    await status_update_succeeds(bridge, "locB", "msg-b")


@pytest.mark.gen_test
async def test_agency_install_names_a_location_it_could_not_mint(bridge):
    await bridge.start()
    bridge.ghl.deactivate("locB")
    response = await agency_install(bridge, ["locA", "locB"])
    assert response.code == 200, response.body
    assert b"Could not install: locB" in response.body
    assert bridge.daemon.installations.location_ids() == ["locA"]


# -- POST /api/ghl/v1/webhook/app ----------------------------------------------------------------


@pytest.mark.gen_test
async def test_app_webhook_without_signature_is_401_and_changes_nothing(bridge):
    await bridge.start()
    await bridge.install("loc1")
    body = json.dumps(app_event("UNINSTALL", "loc1"))
    request = HTTPRequest(
        bridge.daemon.url + APP_WEBHOOK,
        method="POST",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    assert response.code == 401
    assert json.loads(response.body)["error"] == "invalid_signature"
    assert bridge.daemon.installations.get("loc1") is not None


@pytest.mark.gen_test
async def test_app_webhook_with_signature_of_another_body_is_401(bridge):
    await bridge.start()
    await bridge.install("loc1")
    forged = bridge.ghl.sign(json.dumps(app_event("UNINSTALL", "other")).encode())
    response = await post_app_webhook(bridge, app_event("UNINSTALL", "loc1"), headers=forged)
    assert response.code == 401
    assert json.loads(response.body)["error"] == "invalid_signature"
    assert bridge.daemon.installations.get("loc1") is not None


@pytest.mark.gen_test
async def test_app_webhook_with_garbage_signature_is_401(bridge):
    await bridge.start()
    await bridge.install("loc1")
    garbage = {"X-GHL-Signature": "bm90IGEgc2lnbmF0dXJl", "X-WH-Signature": "%%%"}
    response = await post_app_webhook(bridge, app_event("UNINSTALL", "loc1"), headers=garbage)
    assert response.code == 401
    assert bridge.daemon.installations.get("loc1") is not None


@pytest.mark.gen_test
async def test_install_webhook_retried_ten_minutes_late_is_completed(bridge):
    await bridge.start()
    assert (await agency_install(bridge, ["locA"])).code == 200
    bridge.ghl.add_company_location("agency1", "locC")
    event = app_event("INSTALL", "locC", company_id="agency1", timestamp=iso_timestamp(600))
    response = await post_app_webhook(bridge, event)
    assert response.code == 200, response.body
    assert bridge.daemon.installations.get("locC"), response.body
    assert bridge.daemon.installations.get("locC")["status"] == "ok"
    await status_update_succeeds(bridge, "locC", "msg-c")


@pytest.mark.gen_test
async def test_repeated_webhook_id_is_acted_on_once(bridge):
    await bridge.start()
    await bridge.install("loc1")
    event = app_event("UNINSTALL", "loc1")
    assert (await post_app_webhook(bridge, event)).code == 200
    bridge.ghl.add_auth_code("code-reinstall", location_id="loc1")
    assert (await callback(bridge, code="code-reinstall")).code == 200
    repeated = await post_app_webhook(bridge, event)
    assert repeated.code == 200
    assert json.loads(repeated.body)["status"] == "duplicate"
    assert bridge.daemon.installations.get("loc1") is not None


@pytest.mark.parametrize("alg", ["ed25519", "rsa", "ecdsa"])
@pytest.mark.gen_test
async def test_signed_uninstall_removes_the_location_tokens(bridge, config_dir, capsys, alg):
    await bridge.start()
    await bridge.install("loc1")
    await bridge.install("loc2")
    response = await post_app_webhook(bridge, app_event("UNINSTALL", "loc1"), alg=alg)
    assert response.code == 200, response.body
    assert bridge.daemon.installations.location_ids() == ["loc2"]
    assert stored_on_disk(config_dir, "installs", "loc1") is None
    await bridge.stop()
    assert main(["--config", config_dir.config_path, "installs"]) == 0
    out = capsys.readouterr().out
    assert "loc1" not in out
    assert "loc2" in out


@pytest.mark.gen_test
async def test_company_uninstall_removes_the_company_and_its_locations(bridge, config_dir):
    await bridge.start()
    assert (await agency_install(bridge, ["locA", "locB"])).code == 200
    await bridge.install("loc-other", company_id="comp-other")
    response = await post_app_webhook(bridge, app_event("UNINSTALL", company_id="agency1"))
    assert response.code == 200, response.body
    assert bridge.daemon.installations.location_ids() == ["loc-other"]
    assert stored_on_disk(config_dir, "companies", "agency1") is None
    assert stored_on_disk(config_dir, "installs", "locA") is None


@pytest.mark.gen_test
async def test_uninstall_of_unknown_location_is_200(bridge):
    await bridge.start()
    response = await post_app_webhook(bridge, app_event("UNINSTALL", "never-installed"))
    assert response.code == 200


@pytest.mark.gen_test
async def test_install_webhook_mints_the_location_token_with_the_company_token(bridge, config_dir):
    await bridge.start()
    assert (await agency_install(bridge, ["locA"])).code == 200
    bridge.ghl.add_company_location("agency1", "locC")
    response = await post_app_webhook(bridge, app_event("INSTALL", "locC", company_id="agency1"))
    assert response.code == 200, response.body
    record = bridge.daemon.installations.get("locC")
    assert record["company_id"] == "agency1"
    assert stored_on_disk(config_dir, "installs", "locC") == record
    (mint,) = [
        c
        for c in bridge.ghl.calls_to("POST", "/oauth/locationToken")
        if c.form["locationId"] == "locC"
    ]
    assert mint.form["companyId"] == "agency1"
    await status_update_succeeds(bridge, "locC", "msg-c")


@pytest.mark.gen_test
async def test_install_webhook_without_company_token_is_kept_on_disk(bridge, config_dir):
    await bridge.start()
    response = await post_app_webhook(bridge, app_event("INSTALL", "loc1", company_id="comp9"))
    assert response.code == 200
    assert bridge.daemon.installations.get("loc1") is None
    assert stored_on_disk(config_dir, "pending_installs", "loc1")["company_id"] == "comp9"
    assert bridge.ghl.calls == []


@pytest.mark.gen_test
async def test_install_webhook_that_cannot_mint_is_still_200(bridge):
    await bridge.start()
    assert (await agency_install(bridge, ["locA"])).code == 200
    bridge.ghl.add_company_location("agency1", "locC")
    bridge.ghl.deactivate("locC")
    response = await post_app_webhook(bridge, app_event("INSTALL", "locC", company_id="agency1"))
    assert response.code == 200
    assert bridge.daemon.installations.get("locC") is None


@pytest.mark.gen_test
async def test_other_app_webhook_types_are_ignored_with_200(bridge):
    await bridge.start()
    await bridge.install("loc1")
    calls = len(bridge.ghl.calls)
    response = await post_app_webhook(bridge, app_event("LocationUpdate", "loc1"))
    assert response.code == 200
    assert json.loads(response.body)["status"] == "ignored"
    assert bridge.daemon.installations.get("loc1") is not None
    assert len(bridge.ghl.calls) == calls


@pytest.mark.gen_test
async def test_uninstall_dated_in_the_future_leaves_a_tombstone_dated_now(bridge):
    """A timestamp ahead of our clock (skew or a bad value) is taken as the moment we heard of
    the event: its tombstone expires like any other and outranks no later reinstall."""
    await bridge.start()
    await bridge.install("loc1")
    event = app_event("UNINSTALL", "loc1", timestamp=iso_timestamp(seconds_ago=-30 * 86400))
    before = time.time()
    assert (await post_app_webhook(bridge, event)).code == 200
    assert bridge.daemon.installations.get("loc1") is None
    tombstone = bridge.daemon.state.get("uninstalls", "loc1")
    assert before <= tombstone["at"] <= time.time()


@pytest.mark.gen_test
async def test_callback_with_oauth_error_says_the_install_was_not_authorised(bridge):
    """`?error=access_denied` (the user declined) names GHL's error, escaped, and calls no one."""
    await bridge.start()
    response = await callback(bridge, error="access_denied<script>")
    assert response.code == 400
    page = response.body.decode()
    assert "not authorised" in page and "access_denied&lt;script&gt;" in page
    assert "<script>" not in page
    assert bridge.ghl.calls_to("POST", "/oauth/token") == []

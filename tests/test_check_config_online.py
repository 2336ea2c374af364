"""`check-config --online` against the fakes: one `ok|FAIL|WARN what: detail` line per check, a
FAIL exits non-zero, no secret is printed, nothing is sent; without --online, no network call."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from http import HTTPStatus

import pytest

from castghld.cast import CastAccount

SECRETS = ("test-secret", "cast_test_key", "cast_loc2_key", "inbound-secret", "wrong-secret")


async def check_config(config_dir, extra: dict, *options: str) -> tuple[int, str, str]:
    """Run `castghld check-config` in a child process while the fakes keep serving."""
    path = config_dir.write(extra)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "castghld",
        "--config",
        path,
        "check-config",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    stdout, stderr = out.decode(), err.decode()
    for secret in SECRETS:
        assert secret not in stdout + stderr
    assert "Traceback" not in stderr
    return proc.returncode, stdout, stderr


def wired(fake_ghl, fake_cast, **sections) -> dict:
    extra = {"ghl": {"api_base": fake_ghl.url}, "cast": {"api_base": fake_cast.url}}
    for name, values in sections.items():
        extra[name] = {**extra.get(name, {}), **values}
    return extra


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def lines_of(stdout: str, level: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(level + " ")]


def host(url: str) -> str:
    return url.split("://", 1)[1]


def key_name(api_key: str) -> str:
    return CastAccount(api_key, "").name


@pytest.mark.gen_test(timeout=60)
async def test_online_check_passes_with_accepted_credentials(config_dir, fake_ghl, fake_cast):
    fake_cast.api_keys["cast_loc2_key"] = "acct2"
    fake_cast.set_sender_ids("acct", [{"sender_id": "CASTDEMO", "label": "", "channel": "sms"}])
    fake_cast.set_sender_ids("acct2", [{"sender_id": "LOC2", "label": "", "channel": "sms"}])
    fake_cast.set_credits("acct2", 1200)
    extra = wired(
        fake_ghl,
        fake_cast,
        cast={
            "sender_id": "CASTDEMO",
            "locations": {"loc2": {"api_key": "cast_loc2_key", "sender_id": "LOC2"}},
        },
    )
    code, stdout, _ = await check_config(config_dir, extra, "--online")
    assert code == 0, stdout
    assert stdout.strip().endswith("\nok")
    acct, acct2 = key_name("cast_test_key"), key_name("cast_loc2_key")
    assert lines_of(stdout, "ok") == [
        "ok GHL client credentials (ghl.client_id test-client): accepted by "
        f"{host(fake_ghl.url)} (a made-up authorization code got 400 invalid_grant: "
        "Invalid grant: authorization code is invalid)",
        f"ok Cast key cast.api_key ({acct}): accepted by "
        f"{host(fake_cast.url)} (a made-up message id got 404 NOT_FOUND)",
        f"ok Cast account {acct} (cast.api_key): 1000000 credits PHP, billing topup, "
        "channels sms, otp, bulk",
        f"ok Cast key cast.locations.loc2.api_key ({acct2}): accepted by "
        f"{host(fake_cast.url)} (a made-up message id got 404 NOT_FOUND)",
        f"ok Cast account {acct2} (cast.locations.loc2.api_key): 1200 credits PHP, billing "
        "topup, channels sms, otp, bulk",
        f"ok sender_id 'CASTDEMO' (cast.sender_id): approved for sms on {acct}",
        f"ok sender_id 'LOC2' (cast.locations.loc2.sender_id): approved for sms on {acct2}",
    ]
    # The tests' default key is a sandbox key, and named so; the other is not.
    assert lines_of(stdout, "WARN") == [
        f"WARN Cast key cast.api_key ({acct}): a sandbox key: Cast delivers nothing and charges "
        "nothing"
    ]
    [token_call] = fake_ghl.calls
    assert (token_call.method, token_call.path) == ("POST", "/oauth/token")
    assert token_call.form["grant_type"] == "authorization_code"
    assert {c.headers["X-API-Key"] for c in fake_cast.calls} == {"cast_test_key", "cast_loc2_key"}
    assert all(c.method == "GET" for c in fake_cast.calls)
    assert {c.path.split("/api/v1/", 1)[1].split("/", 1)[0] for c in fake_cast.calls} == {
        "sms",
        "account",
    }
    assert fake_cast.sent == []
    assert fake_ghl.issued_tokens == []
    assert fake_ghl.violations == [] and fake_cast.violations == []


@pytest.mark.gen_test(timeout=60)
async def test_online_check_fails_when_ghl_rejects_the_client_secret(
    config_dir, fake_ghl, fake_cast
):
    extra = wired(fake_ghl, fake_cast, ghl={"client_secret": "wrong-secret"})
    code, stdout, stderr = await check_config(config_dir, extra, "--online")
    assert code == 2
    assert lines_of(stdout, "FAIL") == [
        "FAIL GHL client credentials (ghl.client_id test-client): GHL rejected "
        "client_id/client_secret (401 invalid_client: client authentication failed)"
    ]
    assert "castghld: 1 online check(s) failed" in stderr
    assert not stdout.strip().endswith("ok")
    # The fake counts a wrong secret as a broken contract: here it is the mistake under test.
    assert fake_ghl.violations == ["POST /oauth/token: wrong client_id or client_secret"]
    assert fake_cast.violations == []


@pytest.mark.gen_test(timeout=60)
async def test_online_check_fails_with_casts_code_for_a_wrong_key(config_dir, fake_ghl, fake_cast):
    extra = wired(fake_ghl, fake_cast, cast={"api_key": "cast_wrong_key"})
    code, stdout, _ = await check_config(config_dir, extra, "--online")
    assert code == 2
    assert lines_of(stdout, "FAIL") == [
        f"FAIL Cast key cast.api_key ({key_name('cast_wrong_key')}): Cast refused the key: "
        "401 INVALID_API_KEY Invalid API key"
    ]
    assert "cast_wrong_key" not in stdout
    assert lines_of(stdout, "ok")[0].startswith("ok GHL client credentials")
    assert fake_ghl.violations == [] and fake_cast.violations == []


@pytest.mark.gen_test(timeout=60)
async def test_online_check_fails_with_casts_code_for_a_revoked_key(
    config_dir, fake_ghl, fake_cast
):
    revoked = {"success": False, "error": "API key revoked", "error_code": "API_KEY_REVOKED"}
    fake_cast.fail_next("sms_status", 403, revoked)
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    assert code == 2
    assert lines_of(stdout, "FAIL") == [
        f"FAIL Cast key cast.api_key ({key_name('cast_test_key')}): Cast refused the key: "
        "403 API_KEY_REVOKED API key revoked"
    ]


@pytest.mark.parametrize(
    ("section", "failing", "working"),
    [
        ("cast", f"Cast key cast.api_key ({key_name('cast_test_key')})", "GHL client credentials"),
        ("ghl", "GHL client credentials (ghl.client_id test-client)", "Cast key cast.api_key"),
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_online_check_names_an_unreachable_upstream(
    config_dir, fake_ghl, fake_cast, section, failing, working
):
    url = closed_port_url()
    extra = wired(fake_ghl, fake_cast, **{section: {"api_base": url}})
    code, stdout, _ = await check_config(config_dir, extra, "--online")
    assert code == 75  # only an upstream that did not answer: try again later
    [line] = lines_of(stdout, "FAIL")
    assert line.startswith(f"FAIL {failing}: no answer from {host(url)} (waited at most 5 s: ")
    # libcurl's own words say why, not only "CurlError"
    assert "s: CurlError (Failed to connect to 127.0.0.1" in line, line
    assert lines_of(stdout, "ok")[0].startswith(f"ok {working}")


@pytest.mark.gen_test(timeout=60)
async def test_online_check_gives_a_hanging_upstream_5_seconds(config_dir, fake_ghl, fake_cast):
    fake_cast.hang("sms_status")
    started = time.monotonic()
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    elapsed = time.monotonic() - started
    fake_cast.release("sms_status")
    assert code == 75
    assert "FAIL Cast key cast.api_key" in stdout and "waited at most 5 s" in stdout
    assert 5.0 <= elapsed < 15.0


@pytest.mark.gen_test(timeout=60)
async def test_online_check_fails_on_a_refusal_even_beside_an_unreachable_upstream(
    config_dir, fake_ghl, fake_cast
):
    extra = wired(fake_ghl, fake_cast, cast={"api_base": closed_port_url()})
    extra["ghl"]["client_secret"] = "wrong-secret"
    code, stdout, _ = await check_config(config_dir, extra, "--online")
    assert code == 2  # a refused credential is a config problem, not a transient one
    assert len(lines_of(stdout, "FAIL")) == 2
    fake_ghl.violations.clear()  # the wrong secret under test


@pytest.mark.gen_test(timeout=60)
async def test_check_config_without_online_makes_no_network_call(config_dir, fake_ghl, fake_cast):
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast))
    assert code == 0
    assert stdout.strip().endswith("ok")
    assert not any(line.split(" ", 1)[0] in ("FAIL", "WARN") for line in stdout.splitlines())
    assert fake_ghl.calls == [] and fake_cast.calls == []


@pytest.mark.parametrize("status", [302, 307, 308])
@pytest.mark.gen_test(timeout=60)
async def test_online_check_follows_no_redirect_with_the_secret_or_the_key(
    config_dir, fake_ghl, fake_cast, elsewhere, status
):
    url, seen = elsewhere
    fake_ghl.fail_next("token", status, "", headers={"Location": url})
    fake_cast.fail_next("sms_status", status, "", headers={"Location": url})
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    assert seen == []  # libcurl would re-POST client_secret (307/308) and resend X-API-Key
    assert code == 2  # an answer, not an upstream that did not answer
    ghl_line, cast_line = lines_of(stdout, "FAIL")
    assert ghl_line.startswith("FAIL GHL client credentials (ghl.client_id test-client): ")
    assert ghl_line.endswith("; the credentials were not checked")
    assert f" answered {status} " in ghl_line
    assert cast_line.startswith(f"FAIL Cast key cast.api_key ({key_name('cast_test_key')}): ")
    assert cast_line.endswith(
        f" answered {status} HTTP_{status} {HTTPStatus(status).phrase}; the key was not checked"
    )


HTML_400 = "<html><body><h1>400 Bad Request</h1>nginx</body></html>"


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (400, HTML_400, 2),  # a proxy's page: neither upstream said anything about the credentials
        (400, "", 2),
        (404, {"detail": "Not Found"}, 2),  # some other JSON service behind a wrong api_base
        (502, "<html>502 Bad Gateway</html>", 75),  # a proxy whose upstream is down: try later
    ],
)
@pytest.mark.gen_test(timeout=60)
async def test_online_check_is_not_fooled_by_an_answer_that_is_not_the_upstreams(
    config_dir, fake_ghl, fake_cast, status, body, code
):
    fake_ghl.fail_next("token", status, body)
    fake_cast.fail_next("sms_status", status, body)
    got, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    assert got == code, stdout
    assert lines_of(stdout, "ok") == []
    ghl_line, cast_line = lines_of(stdout, "FAIL")
    assert ghl_line.endswith("the credentials were not checked"), ghl_line
    assert cast_line.endswith("the key was not checked"), cast_line
    assert f" answered {status} " in ghl_line and f" answered {status} " in cast_line


@pytest.mark.gen_test(timeout=60)
async def test_online_check_fails_when_a_made_up_code_or_id_gets_a_success(
    config_dir, fake_ghl, fake_cast
):
    fake_ghl.fail_next("token", 200, {})  # a catch-all JSON service behind a wrong api_base
    fake_cast.fail_next("sms_status", 200, {})
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    assert code == 2
    assert not stdout.strip().endswith("ok")
    assert lines_of(stdout, "ok") == []
    ghl_line, cast_line = lines_of(stdout, "FAIL")
    assert ghl_line.startswith("FAIL GHL client credentials (ghl.client_id test-client): ")
    assert ghl_line.endswith("the credentials were not checked")
    assert cast_line.startswith(f"FAIL Cast key cast.api_key ({key_name('cast_test_key')}): ")
    assert cast_line.endswith("answered 2xx without Cast's success: true; the key was not checked")


@pytest.mark.gen_test(timeout=60)
async def test_online_check_prints_neither_an_echoed_secret_nor_an_upstreams_line_break(
    config_dir, fake_ghl, fake_cast
):
    echo = (
        "bad request: client_id=test-client&client_secret=test-secret&code=x\n"
        "ok Cast key cast.api_key (acct-forged): accepted"
    )
    answer = {"error": "invalid_request for +639171234567", "error_description": echo}
    fake_ghl.fail_next("token", 400, answer)
    forged = {"success": False, "error": "key cast_test_key\nok all good", "error_code": "NOPE"}
    fake_cast.fail_next("sms_status", 403, forged)
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    # check_config() asserts no SECRETS in stdout/stderr
    assert code == 2
    assert "acct-forged" not in "".join(lines_of(stdout, "ok"))
    assert not any(line.startswith("ok all good") for line in stdout.splitlines())
    ghl_line, cast_line = lines_of(stdout, "FAIL")
    assert "\\nok Cast key cast.api_key (acct-forged)" in ghl_line
    assert "400 invalid_request for [number]: bad request: " in ghl_line
    assert cast_line.endswith("403 NOPE key [secret]\\nok all good")


@pytest.mark.gen_test(timeout=60)
async def test_online_check_not_run_says_so_when_the_config_fails_first(
    config_dir, fake_ghl, fake_cast
):
    os.chmod(config_dir.key_path, 0o644)  # a problem found before the online checks
    code, _, stderr = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        "castghld: online checks not run (--online): fix the problem(s) above first"
    )
    assert "state.key_file" in stderr
    assert fake_ghl.calls == [] and fake_cast.calls == []


def test_printed_upstream_text_redacts_a_number_and_a_secret_after_a_line_break(config_dir):
    from castghld.online import _printable

    config = config_dir.load()
    text = _printable(config, "refused for\n09171234567\nclient_secret=SUPERSECRET")
    assert "9171234567" not in text and "SUPERSECRET" not in text and "\n" not in text


@pytest.mark.gen_test(timeout=60)
async def test_online_check_fails_a_sender_id_cast_has_not_approved_for_sms(
    config_dir, fake_ghl, fake_cast
):
    fake_cast.set_sender_ids(
        "acct",
        [
            {"sender_id": "SIMONLY", "label": "gateway", "channel": "sim"},
            {"sender_id": "CASTDEMO", "label": "", "channel": "sms"},
        ],
    )
    extra = wired(
        fake_ghl,
        fake_cast,
        cast={
            "sender_id": "SIMONLY",
            "locations": {"loc2": {"sender_id": "NOTLISTED"}, "loc3": {"sender_id": "CASTDEMO"}},
        },
    )
    code, stdout, stderr = await check_config(config_dir, extra, "--online")
    assert code == 2
    acct = key_name("cast_test_key")
    assert lines_of(stdout, "FAIL") == [
        f"FAIL sender_id 'SIMONLY' (cast.sender_id): approved on {acct} for sim only, not sms; "
        "Cast would refuse its sends",
        f"FAIL sender_id 'NOTLISTED' (cast.locations.loc2.sender_id): not approved on {acct} "
        "(approved for sms: CASTDEMO); Cast would refuse its sends",
    ]
    assert "ok sender_id 'CASTDEMO' (cast.locations.loc3.sender_id): approved for sms" in stdout
    assert "castghld: 2 online check(s) failed" in stderr


@pytest.mark.gen_test(timeout=60)
async def test_online_check_prints_the_balance_billing_and_channels_of_each_account(
    config_dir, fake_ghl, fake_cast
):
    fake_cast.set_credits("acct", -40, billing_type="postpaid", credit_limit=500)
    fake_cast.set_sender_ids("acct", [{"sender_id": "ONLY", "label": "", "channel": "sms"}])
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    assert code == 0, stdout
    acct = key_name("cast_test_key")
    assert (
        f"ok Cast account {acct} (cast.api_key): -40 credits PHP, billing postpaid, channels "
        "sms, otp, bulk\n" in stdout
    )
    assert (
        f"ok sender_id (cast.sender_id): not set: Cast sends with {acct}'s only approved "
        "sender ID 'ONLY'" in stdout
    )


@pytest.mark.gen_test(timeout=60)
async def test_online_check_fails_an_account_that_may_not_send_sms(config_dir, fake_ghl, fake_cast):
    fake_cast.allow_channels("acct", ["otp"])
    code, stdout, _ = await check_config(config_dir, wired(fake_ghl, fake_cast), "--online")
    assert code == 2
    [line] = lines_of(stdout, "FAIL")
    assert line.startswith(f"FAIL Cast account {key_name('cast_test_key')} (cast.api_key): ")
    assert line.endswith("channels otp; sms is not an allowed channel")


@pytest.mark.gen_test(timeout=60)
async def test_online_check_names_an_account_by_its_configured_name(
    config_dir, fake_ghl, fake_cast
):
    fake_cast.set_sender_ids("acct", [{"sender_id": "ACME", "label": "", "channel": "sms"}])
    extra = wired(fake_ghl, fake_cast, cast={"account": "acme", "sender_id": "ACME"})
    code, stdout, _ = await check_config(config_dir, extra, "--online")
    assert code == 0, stdout
    assert "ok Cast key cast.api_key (acme): accepted by " in stdout
    assert "ok Cast account acme (cast.api_key): 1000000 credits PHP" in stdout
    assert "ok sender_id 'ACME' (cast.sender_id): approved for sms on acme" in stdout

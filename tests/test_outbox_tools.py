"""`castghld outbox ...` as an operator runs it beside a real `castghld serve` process: bare GHL
message ids, where a message is (`show`), `retry` cutting a backoff short, `drop` of a send in
flight, the operator's log lines, and no secrets needed to run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from daemon_process import ServeProcess

from castghld.fakes import wait_for

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
# Cast is down and asks us to come back in 5 minutes: the message waits in the timer heap.
UNAVAILABLE = {"headers": {"Retry-After": "300"}}


@pytest.fixture
def serve(config_dir, fake_ghl, fake_cast):
    process = ServeProcess(config_dir, fake_ghl, fake_cast, extra={"logging": {"format": "json"}})
    yield process
    process.close()
    assert fake_ghl.violations == []
    assert fake_cast.violations == []


def statuses(ghl, message_id):
    return [report["status"] for report in ghl.statuses.get(message_id, [])]


def log_events(serve) -> list[dict]:
    return [json.loads(line) for line in serve.log().splitlines() if line.startswith("{")]


async def waiting_for_a_send_retry(serve, fake_cast, *message_ids: str) -> None:
    """Each message failed its first send (503, Retry-After 300) and waits for its retry."""
    fake_cast.fail_next("send", 503, times=len(message_ids), **UNAVAILABLE)
    for message_id in message_ids:
        assert (await serve.post_message(message_id)).code == 200
    await wait_for(lambda: len(fake_cast.calls_to("POST", "/api/v1/sms/send")) == len(message_ids))
    await wait_for(lambda: "retrying in" in serve.log())


@pytest.mark.gen_test(timeout=60)
async def test_show_says_where_a_send_retry_waits_by_the_bare_message_id(serve, fake_cast):
    await serve.start()
    await serve.install("loc1")
    await waiting_for_a_send_retry(serve, fake_cast, "m1")
    await wait_for(lambda: "next at" in serve.cli("outbox", "show", "m1").stdout)
    result = serve.cli("outbox", "show", "m1")
    assert result.returncode == 0, result.stderr
    lines = {
        name: value.strip()
        for name, value in (line.split(":", 1) for line in result.stdout.splitlines())
    }
    assert lines["id"] == "out:m1"
    assert re.fullmatch(rf"waiting to retry send \(attempt 1, next at {ISO}\)", lines["state"])
    assert lines["attempts"] == "1"
    assert lines["last_error"].startswith("503 SERVICE_UNAVAILABLE")
    assert re.fullmatch(ISO, lines["next_attempt_at"])
    assert re.fullmatch(ISO, lines["received_at"])
    # The prefixed form still works, and the JSON carries the same.
    doc = json.loads(serve.cli("outbox", "show", "out:m1", "--json").stdout)
    assert doc["attempts"] == 1 and doc["state"].startswith("waiting to retry send")


@pytest.mark.gen_test(timeout=60)
async def test_retry_cuts_a_send_backoff_short(serve, fake_cast, fake_ghl):
    await serve.start()
    await serve.install("loc1")
    await waiting_for_a_send_retry(serve, fake_cast, "m1")
    result = serve.cli("outbox", "retry", "m1")
    assert (result.returncode, result.stdout.strip()) == (0, "out:m1: retried"), result.stderr
    await wait_for(lambda: statuses(fake_ghl, "m1") == ["pending", "delivered"], timeout=20)
    retried = [e for e in log_events(serve) if e.get("outcome") == "retried"]
    assert retried and retried[0]["message_id"] == "m1" and retried[0]["location_id"] == "loc1"


@pytest.mark.gen_test(timeout=60)
async def test_retry_all_cuts_every_send_backoff_of_an_account_short(serve, fake_cast, fake_ghl):
    await serve.start()
    await serve.install("loc1")
    await waiting_for_a_send_retry(serve, fake_cast, "m1", "m2")
    account = json.loads(serve.cli("outbox", "show", "m1", "--json").stdout)["account"]
    result = serve.cli("outbox", "retry", "--all", "--account", "acct-other")
    assert (result.returncode, result.stdout.strip()) == (0, "0 send(s) retried now")
    result = serve.cli("outbox", "retry", "--all", "--account", account)
    assert (result.returncode, result.stdout.strip()) == (0, "2 send(s) retried now")
    for message_id in ("m1", "m2"):
        await wait_for(lambda m=message_id: statuses(fake_ghl, m) == ["pending", "delivered"])


@pytest.mark.gen_test(timeout=60)
async def test_drop_of_a_send_in_flight_says_so_and_logs_no_traceback(serve, fake_cast, fake_ghl):
    await serve.start()
    await serve.install("loc1")
    fake_cast.hang("send")
    assert (await serve.post_message("m1")).code == 200
    await wait_for(lambda: fake_cast.hung("send") == 1)
    result = serve.cli("outbox", "drop", "m1")
    assert result.returncode == 1
    assert "in flight" in result.stderr and "not dropped" in result.stderr
    fake_cast.release("send")
    await wait_for(lambda: statuses(fake_ghl, "m1") == ["pending", "delivered"], timeout=20)
    assert "Traceback" not in serve.log()


@pytest.mark.gen_test(timeout=60)
async def test_operator_drop_line_names_the_message(serve, fake_cast, fake_ghl):
    await serve.start()
    await serve.install("loc1")
    await waiting_for_a_send_retry(serve, fake_cast, "m1")
    result = serve.cli("outbox", "drop", "m1")
    assert (result.returncode, result.stdout.strip()) == (0, "out:m1: dropped"), result.stderr
    await wait_for(lambda: any(e.get("outcome") == "dropped" for e in log_events(serve)))
    dropped = [e for e in log_events(serve) if e.get("outcome") == "dropped"]
    assert dropped[0]["message_id"] == "m1" and dropped[0]["location_id"] == "loc1"
    assert dropped[0]["reason"] == "operator"


def run_without_credentials(config_path: str, *args: str) -> subprocess.CompletedProcess:
    """An operator's shell: no $CREDENTIALS_DIRECTORY, no $RUNTIME_DIRECTORY."""
    env = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY",)}
    env.pop("RUNTIME_DIRECTORY", None)
    command = [sys.executable, "-m", "castghld", "--config", config_path, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def use_credentials_directory(config_path: str, credentials, key_file: bool = False) -> None:
    """Rewrite the config as README's production one: every secret a `${CREDENTIALS_DIRECTORY}`
    file (and the state key too, with `key_file`)."""
    with open(config_path) as f:
        config = yaml.safe_load(f)
    credentials.mkdir(mode=0o700, exist_ok=True)
    for section, name in (
        ("ghl", "client_secret"),
        ("cast", "api_key"),
        ("cast", "inbound_secret"),
    ):
        value = config[section].pop(name)
        (credentials / name).write_text(value + "\n")
        os.chmod(credentials / name, 0o600)
        config[section][f"{name}_file"] = "${CREDENTIALS_DIRECTORY}/" + name
    if key_file:
        os.link(
            os.path.join(os.path.dirname(config_path), config["state"]["key_file"]),
            credentials / "state_key",
        )
        config["state"]["key_file"] = "${CREDENTIALS_DIRECTORY}/state_key"
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)


@pytest.mark.gen_test(timeout=60)
async def test_outbox_forget_and_installs_need_no_secrets(serve, fake_cast, tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    use_credentials_directory(serve.config_path, credentials)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))  # the unit's environment
    await serve.start()
    await serve.install("loc1")
    await waiting_for_a_send_retry(serve, fake_cast, "m1")
    result = run_without_credentials(serve.config_path, "outbox")
    assert result.returncode == 0, result.stderr
    assert "out:m1" in result.stdout
    result = run_without_credentials(serve.config_path, "installs")
    assert result.returncode == 0, result.stderr
    assert "loc1" in result.stdout
    result = run_without_credentials(serve.config_path, "forget", "loc-unknown")
    assert result.returncode == 1 and "not installed" in result.stderr
    # serve and check-config still want every secret.
    result = run_without_credentials(serve.config_path, "check-config")
    assert result.returncode == 2 and "CREDENTIALS_DIRECTORY is not set" in result.stderr


def test_installs_names_only_the_state_key_when_it_is_a_credential(config_dir, tmp_path):
    path = config_dir.write()
    use_credentials_directory(path, tmp_path / "credentials", key_file=True)
    result = run_without_credentials(path, "installs")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"castghld: {path}: state.key_file: environment variable CREDENTIALS_DIRECTORY is not "
        "set (systemd sets it for the castghld unit's processes only; elsewhere give the secret "
        "file's own path)"
    ]
    result = run_without_credentials(path, "outbox")  # needs no key: no daemon is the problem
    assert result.returncode == 75 and "no running castghld answers" in result.stderr

"""Config loading: every mistake is one clear line naming file and key."""

from __future__ import annotations

import os
import time

import pytest
import yaml
from conftest import BASE_CONFIG, merge

from castghld.config import ConfigError, Secret, load_config, parse_duration


def problems_of(config_dir, extra=None, raw=None) -> list[str]:
    path = config_dir.write(extra, raw=raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_valid_config_loads_with_defaults(config_dir):
    config = config_dir.load()
    assert config.server.public_url == "https://ghl.example.ph"
    assert config.redirect_uri == "https://ghl.example.ph/oauth/callback"
    assert config.tokens.refresh_interval == 300
    assert config.cast.messages_per_second == 10
    assert config.state.dir == config_dir.state_dir
    assert config.delivery.allowed_regions == ("PH",)


def test_unknown_key_names_file_and_key_path(config_dir):
    problems = problems_of(config_dir, {"server": {"prot": 8080}})
    assert problems == [f"{config_dir.config_path}: server.prot: unknown key (did you mean port?)"]


def test_unknown_top_level_section(config_dir):
    problems = problems_of(config_dir, {"cats": {}})
    assert len(problems) == 1 and "cats: unknown key" in problems[0]


def test_every_problem_is_reported(config_dir):
    problems = problems_of(
        config_dir, {"server": {"port": "eighty"}, "tokens": {"refresh_margin": "soon"}}
    )
    assert len(problems) == 2
    assert any("server.port: must be an integer" in p for p in problems)
    assert any("tokens.refresh_margin: must be a duration" in p for p in problems)


def test_missing_secret_is_an_error(config_dir):
    path = config_dir.write(
        raw=(
            "server: {public_url: 'https://x.ph'}\n"
            "ghl: {client_id: abc}\n"
            "cast: {api_key: k, inbound_secret: s}\n"
        )
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: ghl.client_secret: is required (set client_secret or client_secret_file)"
    ]


def test_secret_from_file(config_dir, tmp_path):
    secret = tmp_path / "ghl_secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    config = config_dir.load({"ghl": {"client_secret": None, "client_secret_file": str(secret)}})
    assert config.ghl.client_secret.value == "s3cret"
    assert "s3cret" not in repr(config)


def test_world_readable_secret_file_is_refused(config_dir, tmp_path):
    secret = tmp_path / "cast_key"
    secret.write_text("cast_live_x")
    secret.chmod(0o644)
    problems = problems_of(config_dir, {"cast": {"api_key": None, "api_key_file": str(secret)}})
    assert len(problems) == 1
    assert "cast.api_key_file:" in problems[0]
    assert "accessible by group/others (mode 0644)" in problems[0]
    assert "cast_live_x" not in problems[0]


def test_a_huge_secret_file_is_refused_without_reading_it(config_dir, tmp_path):
    secret = tmp_path / "cast_key"
    secret.write_text("cast_live_x\n")
    secret.chmod(0o600)
    with open(secret, "r+b") as f:  # sparse: 1 GB that would be read whole
        f.truncate(1 << 30)
    started = time.monotonic()
    problems = problems_of(config_dir, {"cast": {"api_key": None, "api_key_file": str(secret)}})
    assert time.monotonic() - started < 5
    assert problems == [
        f"{config_dir.config_path}: cast.api_key_file: secret file {secret} is over 65536 bytes: "
        "not a secret (one line)"
    ]


def test_missing_secret_file(config_dir, tmp_path):
    problems = problems_of(
        config_dir, {"cast": {"inbound_secret": None, "inbound_secret_file": "nope"}}
    )
    assert problems == [
        f"{config_dir.config_path}: cast.inbound_secret_file: secret file "
        f"{tmp_path / 'nope'} does not exist"
    ]


def test_secret_inline_and_file_together_is_an_error(config_dir, tmp_path):
    problems = problems_of(config_dir, {"ghl": {"client_secret_file": "x"}})
    assert "give either client_secret or client_secret_file" in problems[0]


@pytest.mark.parametrize("value", ["5x", "-1", "soon", True])
def test_bad_duration(config_dir, value):
    problems = problems_of(config_dir, {"tokens": {"refresh_interval": value}})
    assert len(problems) == 1 and "tokens.refresh_interval: must be a duration" in problems[0]


def test_send_deadline_beyond_cast_replay_window_is_refused(config_dir):
    problems = problems_of(config_dir, {"delivery": {"send_deadline": "13h"}})
    assert problems == [
        f"{config_dir.config_path}: delivery.send_deadline: must be at most 12h "
        "(Cast remembers idempotency keys for 24h), got '13h'"
    ]


def test_request_timeout_longer_than_the_shutdown_refresh_wait_is_refused(config_dir):
    problems = problems_of(config_dir, {"delivery": {"request_timeout": "30s"}})
    assert problems == [
        f"{config_dir.config_path}: delivery.request_timeout: must be at most 10s (a token "
        "refresh in flight at shutdown is awaited a little longer than this), got '30s'"
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(30, 30), ("30", 30), ("30s", 30), ("5m", 300), ("1h", 3600), ("7d", 604800), ("2.5s", 2.5)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_env_interpolation(config_dir, monkeypatch):
    monkeypatch.setenv("CASTGHLD_TEST_SECRET", "from-env")
    monkeypatch.setenv("CASTGHLD_TEST_HOST", "ghl.example.org")
    config = config_dir.load(
        {
            "ghl": {"client_secret": "${CASTGHLD_TEST_SECRET}"},
            "server": {"public_url": "https://${CASTGHLD_TEST_HOST}"},
        }
    )
    assert config.ghl.client_secret == Secret("from-env")
    assert config.server.public_url == "https://ghl.example.org"


def test_unset_env_variable_is_an_error(config_dir, monkeypatch):
    monkeypatch.delenv("CASTGHLD_UNSET_VAR", raising=False)
    problems = problems_of(config_dir, {"cast": {"api_key": "${CASTGHLD_UNSET_VAR}"}})
    assert problems[0] == (
        f"{config_dir.config_path}: cast.api_key: "
        "environment variable CASTGHLD_UNSET_VAR is not set"
    )


def test_unset_credentials_directory_is_one_problem_not_a_missing_file_too(config_dir, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cast = {"api_key": None, "api_key_file": "${CREDENTIALS_DIRECTORY}/cast_api_key"}
    problems = problems_of(config_dir, {"cast": cast})
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        f"{config_dir.config_path}: cast.api_key_file: "
        "environment variable CREDENTIALS_DIRECTORY is not set (systemd sets it"
    )


def test_a_duration_limit_is_said_in_the_unit_it_was_given_in(config_dir):
    problems = problems_of(config_dir, {"delivery": {"send_deadline": "800m"}})
    assert "must be at most 720m (Cast remembers" in problems[0]
    problems = problems_of(config_dir, {"delivery": {"send_deadline": 50000}})
    assert "must be at most 43200s (Cast remembers" in problems[0]


def test_credentials_directory_through_env(config_dir, tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cast_api_key").write_text("cast_test_abc")
    os.chmod(creds / "cast_api_key", 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = config_dir.load(
        {"cast": {"api_key": None, "api_key_file": "${CREDENTIALS_DIRECTORY}/cast_api_key"}}
    )
    assert config.cast.api_key.value == "cast_test_abc"


def test_invalid_yaml_names_the_line(config_dir):
    problems = problems_of(config_dir, raw="server:\n  port: [1\n")
    assert len(problems) == 1 and "invalid YAML (line" in problems[0]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.yaml"))
    assert "config file does not exist" in info.value.problems[0]


def test_public_url_required_and_checked(config_dir):
    problems = problems_of(config_dir, {"server": {"public_url": "ghl.example.ph"}})
    assert "server.public_url: must be an http(s) URL" in problems[0]


def test_cast_location_overrides(config_dir, tmp_path):
    key = tmp_path / "acme.key"
    key.write_text("cast_test_acme")
    key.chmod(0o600)
    config = config_dir.load(
        {
            "cast": {
                "locations": {
                    "LOC1": {
                        "api_key_file": str(key),
                        "sender_id": "ACME",
                        "inbound_numbers": ["09171234567", "ACME"],
                    }
                }
            }
        }
    )
    loc = config.cast.locations["LOC1"]
    assert loc.api_key.value == "cast_test_acme"
    assert loc.sender_id == "ACME"
    assert loc.inbound_numbers == ("09171234567", "ACME")


def test_cast_location_unknown_key(config_dir):
    problems = problems_of(config_dir, {"cast": {"locations": {"LOC1": {"sender": "X"}}}})
    assert problems == [
        f"{config_dir.config_path}: cast.locations.LOC1.sender: "
        "unknown key (did you mean sender_id?)"
    ]


def test_status_polls_must_increase(config_dir):
    problems = problems_of(config_dir, {"delivery": {"status_polls": ["1m", "5s"]}})
    assert "delivery.status_polls: must be in increasing order" in problems[0]


def test_example_config_is_valid():
    here = os.path.dirname(__file__)
    config = load_config(os.path.join(here, "..", "config", "castghld.example.yaml"))
    assert config.server.port == 8080
    assert config.state.key_file.endswith(os.path.join("var", "state.key"))


def test_key_given_twice_is_an_error(config_dir):
    raw = (
        "server: {public_url: 'https://x.example'}\n"
        "cast: {api_key: a, inbound_secret: s}\n"
        "cast: {api_key: b, inbound_secret: s}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(config_dir.write(raw=raw))
    [problem] = info.value.problems
    assert "line 3" in problem and "'cast' appears twice" in problem


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_infinite_duration_is_refused(config_dir, value):
    raw = yaml.safe_dump(merge(BASE_CONFIG, {})) + f"tokens: {{refresh_margin: {value}}}\n"
    with pytest.raises(ConfigError) as info:
        load_config(config_dir.write(raw=raw))
    assert "tokens.refresh_margin: must be a duration" in info.value.problems[0]


def test_empty_host_is_refused(config_dir):
    problems = problems_of(config_dir, {"server": {"host": ""}})
    assert problems == [
        f"{config_dir.config_path}: server.host: "
        "must not be empty (write 0.0.0.0 to listen on every interface)"
    ]


def test_one_inbound_number_for_two_locations_is_refused(config_dir):
    locations = {
        "locA": {"inbound_numbers": ["09171234567"]},
        "locB": {"inbound_numbers": ["+639171234567"]},
    }
    problems = problems_of(config_dir, {"cast": {"locations": locations}})
    assert len(problems) == 1
    assert "cast.locations.locB.inbound_numbers: '+639171234567' is also" in problems[0]

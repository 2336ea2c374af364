"""The command line: exit codes, one line per problem, no secrets, no tracebacks."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

from castghld.cli import main


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "castghld", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_help_explains_each_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("serve", "check-config", "gen-key", "installs", "install-url"):
        assert command in result.stdout


def test_config_error_exits_2_with_one_line_per_problem(config_dir):
    path = config_dir.write({"server": {"prot": 1}, "cast": {"messages_per_second": 0}})
    result = run_cli("--config", path, "check-config")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"castghld: {path}: ") for line in lines)
    assert "Traceback" not in result.stderr


def test_config_path_from_environment(config_dir):
    path = config_dir.write()
    result = run_cli("check-config", env={"CASTGHLD_CONFIG": path})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_check_config_summary_has_no_secrets(config_dir):
    path = config_dir.write()
    result = run_cli("--config", path, "check-config")
    assert result.returncode == 0, result.stderr
    assert "test-secret" not in result.stdout
    assert "cast_test_key" not in result.stdout
    assert "inbound-secret" not in result.stdout
    assert "redirect uri:  https://ghl.example.ph/oauth/callback" in result.stdout


def test_missing_key_file_is_exit_2(config_dir):
    os.unlink(config_dir.key_path)
    path = config_dir.write()
    result = run_cli("--config", path, "check-config")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"castghld: {config_dir.key_path}: state key file does not exist "
        f"(create it: castghld gen-key {config_dir.key_path})"
    )


def test_missing_config_file_is_exit_2(tmp_path):
    result = run_cli("--config", str(tmp_path / "none.yaml"), "installs")
    assert result.returncode == 2
    assert "config file does not exist" in result.stderr


def test_gen_key_creates_0600_and_refuses_overwrite(tmp_path, capsys):
    path = str(tmp_path / "keys" / "state.key")
    assert main(["gen-key", path]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = pathlib.Path(path).read_text()
    assert main(["gen-key", path]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert pathlib.Path(path).read_text() == first
    assert main(["gen-key", "--if-missing", path]) == 0
    assert pathlib.Path(path).read_text() == first


def test_installs_empty(config_dir, capsys):
    assert main(["--config", config_dir.write(), "installs"]) == 0
    assert capsys.readouterr().out.strip() == "no installations"


def test_install_url(config_dir, capsys):
    assert main(["--config", config_dir.write(), "install-url"]) == 0
    url = urlsplit(capsys.readouterr().out.strip())
    assert f"{url.scheme}://{url.netloc}{url.path}" == (
        "https://marketplace.gohighlevel.com/v2/oauth/chooselocation"
    )
    query = parse_qs(url.query)
    assert query["response_type"] == ["code"]
    assert query["client_id"] == ["test-client"]
    assert query["redirect_uri"] == ["https://ghl.example.ph/oauth/callback"]
    assert query["scope"][0].split() == [
        "conversations/message.write",
        "conversations/message.readonly",
        "conversations.write",
        "conversations.readonly",
        "contacts.readonly",
        "contacts.write",
    ]
    assert query["state"][0]

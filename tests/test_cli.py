"""The command line: exit codes, one line per problem, no secrets, no tracebacks."""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import pytest

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
        f"castghld: {path}: state.key_file {config_dir.key_path}: does not exist; "
        f"create it: castghld gen-key {config_dir.key_path}"
    )
    assert "Traceback" not in result.stderr


def _key_file_readable_by_others(key_path: str) -> str:
    os.chmod(key_path, 0o644)
    return "is accessible by group/others (mode 0644); run: chmod 600 " + key_path


def _key_file_is_a_directory(key_path: str) -> str:
    os.unlink(key_path)
    os.mkdir(key_path, 0o700)
    return "is not a regular file; point state.key_file at a file made by castghld gen-key"


def _key_file_malformed_line(key_path: str) -> str:
    with open(key_path, "a") as f:
        f.write("not-a-key\n")
    return "line 2 is not a state key (expected 32 bytes, base64); restore the line"


def _key_file_empty(key_path: str) -> str:
    pathlib.Path(key_path).write_text("# rotated out\n")
    return "holds no key; restore it from a backup, or delete it and run: castghld gen-key"


def _key_file_binary(key_path: str) -> str:
    pathlib.Path(key_path).write_bytes(b"\xff\xfe state key\n")
    return "is not a state key file (not ASCII text); point state.key_file at a file made by"


def _key_file_huge(key_path: str) -> str:
    with open(key_path, "r+b") as f:  # sparse: a valid first line, then 1 GB of holes
        f.truncate(1 << 30)
    return f"is {1 << 30} bytes, not a state key file (at most 65536 bytes: one line per key)"


def _key_file_is_a_fifo(key_path: str) -> str:
    os.unlink(key_path)
    os.mkfifo(key_path, 0o600)  # no writer: a blocking read would never return
    return "is not a regular file; point state.key_file at a file made by castghld gen-key"


@pytest.mark.parametrize(
    "breakage",
    [
        _key_file_readable_by_others,
        _key_file_is_a_directory,
        _key_file_malformed_line,
        _key_file_empty,
        _key_file_binary,
        _key_file_huge,
        _key_file_is_a_fifo,
    ],
)
def test_bad_key_file_is_exit_2_naming_state_key_file(config_dir, breakage):
    expected = breakage(config_dir.key_path)
    path = config_dir.write()
    result = run_cli("--config", path, "check-config")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    prefix = f"castghld: {path}: state.key_file {config_dir.key_path}: "
    assert lines[0].startswith(prefix), lines[0]
    assert expected in lines[0][len(prefix) :]


def test_key_file_edited_on_windows_still_loads(config_dir):
    """A byte-order mark, CRLF line ends and trailing spaces (an editor's) are not key damage;
    a symlink to the file is followed."""
    key = pathlib.Path(config_dir.key_path)
    line = key.read_text().strip()
    real = config_dir.path / "real.key"
    real.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"  \r\n" + line.encode() + b"\r\n")
    real.chmod(0o600)
    key.unlink()
    key.symlink_to(real)
    result = run_cli("--config", config_dir.write(), "check-config")
    assert result.returncode == 0, result.stderr
    assert f"state key:     {config_dir.key_path} (2 key(s))" in result.stdout


def test_unreachable_key_file_is_exit_2_naming_state_key_file(config_dir, tmp_path):
    key_path = str(tmp_path / "castghld.yaml" / "state.key")  # a file used as a directory
    path = config_dir.write({"state": {"key_file": key_path}})
    result = run_cli("--config", path, "check-config")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"castghld: {path}: state.key_file {key_path}: cannot be read (Not a directory); "
        "check the path"
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
        "oauth.write",
        "oauth.readonly",
    ]
    assert query["state"][0]

"""The systemd unit passes `systemd-analyze verify` once it points at an installed castghld."""

from __future__ import annotations

import configparser
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

UNIT = pathlib.Path(__file__).parent.parent / "systemd" / "castghld.service"
INSTALLED_BINARY = "/opt/castghld/bin/castghld"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (CI installs the systemd package to run this test)",
)


def castghld_binary() -> str:
    """The `castghld` console script of the environment running the tests."""
    beside_python = os.path.join(os.path.dirname(sys.executable), "castghld")
    binary = beside_python if os.access(beside_python, os.X_OK) else shutil.which("castghld")
    assert binary, "no castghld console script: install the package (pip install -e .)"
    return binary


def unit_copy(tmp_path: pathlib.Path, text: str | None = None) -> pathlib.Path:
    """The unit in `tmp_path`, running this environment's castghld instead of /opt's."""
    text = UNIT.read_text() if text is None else text
    assert text.count(INSTALLED_BINARY) == 3  # ExecStartPre, ExecStart, ExecReload's check
    path = tmp_path / "castghld.service"
    path.write_text(text.replace(INSTALLED_BINARY, castghld_binary()))
    return path


def verify(path: pathlib.Path) -> tuple[int, list[str]]:
    """Exit code of `systemd-analyze verify`, and the stderr lines about this unit."""
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )
    about_unit = [line for line in result.stderr.splitlines() if path.name in line]
    return result.returncode, about_unit


@needs_systemd_analyze
def test_unit_verifies_without_warnings(tmp_path):
    returncode, warnings = verify(unit_copy(tmp_path))
    assert warnings == []
    assert returncode == 0


@needs_systemd_analyze
def test_verify_reports_a_broken_unit(tmp_path):
    # Guards the test above: this systemd-analyze does read our unit and does complain.
    broken = UNIT.read_text().replace("Type=notify", "Type=notfy")
    _, warnings = verify(unit_copy(tmp_path, broken))
    assert any("notfy" in line for line in warnings)


def unit_values(name: str) -> list[str]:
    prefix = name + "="
    return [
        line[len(prefix) :] for line in UNIT.read_text().splitlines() if line.startswith(prefix)
    ]


def test_unit_gives_the_admin_socket_a_runtime_directory():
    # /run/castghld/admin.sock: where `castghld outbox` looks first (castghld.admin_client).
    assert unit_values("RuntimeDirectory") == ["castghld"]


def test_documentation_points_at_a_file_the_install_puts_there():
    """pip installs setup.cfg's data_files under the venv (/opt/castghld, README's install)."""
    parser = configparser.ConfigParser()
    parser.read(UNIT.parent.parent / "setup.cfg")
    shipped = parser["options.data_files"]["share/castghld"].split()
    (url,) = unit_values("Documentation")
    assert url.startswith("file:///opt/castghld/share/castghld/")
    assert url.rsplit("/", 1)[1] in shipped

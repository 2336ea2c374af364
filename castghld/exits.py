"""How a `castghld` command ends: its exit code, and its problems on stderr (`castghld: line`).
The CLI and the command modules it calls share these, so none of them imports the CLI back.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_USAGE = 2  # fix the config: systemd does not restart (RestartPreventExitStatus=2)
EXIT_TEMPFAIL = 75  # retry later: systemd restarts (Restart=on-failure)


def fail(problems: Sequence[str], transient: bool = False) -> int:
    """Print each problem on stderr and return the exit code. Under journald each line carries
    the `<3>` (err) priority prefix, as the daemon's error log lines do: `journalctl -u castghld
    -p err` shows why a start failed."""
    for line in problems:
        error(line)
    return EXIT_TEMPFAIL if transient else EXIT_USAGE


def error(line: str) -> None:
    """`castghld: line` on stderr, at journald priority err when stderr is the journal."""
    from castghld.log import stderr_is_journal

    print(f"{'<3>' if stderr_is_journal() else ''}castghld: {line}", file=sys.stderr)

"""SIGKILL a daemon the moment it writes a given kind of file in its state directory.

A separate process (not a thread of the test process) so the fakes' and clients' work cannot
delay the kill: it busy-polls the directory for at most TIMEOUT seconds.

    python killwatch.py STATE_DIR PID MODE TIMEOUT

MODE ``compaction``: a new ``.tmp-outbox-*`` file appears (an outbox compaction is being written).
MODE ``state``: a file other than the outbox journal, its compaction temp files and the lock
appears or changes size (a state commit or a state compaction is being written).

Prints one JSON line: ``{"hit": bool, "file": name, "still_there": bool, "after": seconds}``;
``still_there`` says the file (a compaction's temp file) still existed after the kill, i.e. the
kill landed before the rename.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def _sizes(directory: str) -> dict[str, int]:
    sizes = {}
    for entry in os.scandir(directory):
        try:
            sizes[entry.name] = entry.stat().st_size
        except FileNotFoundError:  # renamed or removed while we looked
            continue
    return sizes


def _is_state_file(name: str) -> bool:
    return not (name.startswith("outbox") or name.startswith(".tmp-outbox-") or name == "lock")


def watch(directory: str, pid: int, mode: str, timeout: float) -> dict:
    start = time.monotonic()
    before = _sizes(directory)
    while time.monotonic() - start < timeout:
        now = _sizes(directory)
        for name, size in now.items():
            if mode == "compaction":
                hit = name.startswith(".tmp-outbox-") and name not in before
            else:
                hit = _is_state_file(name) and before.get(name) != size
            if hit:
                os.kill(pid, signal.SIGKILL)
                still_there = os.path.exists(os.path.join(directory, name))
                after = round(time.monotonic() - start, 3)
                return {"hit": True, "file": name, "still_there": still_there, "after": after}
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
    return {"hit": False, "file": None, "still_there": False, "after": time.monotonic() - start}


if __name__ == "__main__":
    state_dir, pid, mode, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    print(json.dumps(watch(state_dir, pid, mode, timeout)), flush=True)

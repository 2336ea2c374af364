"""Files in the state directory: private creation, atomic replacement, the directory lock.

Both stores (`castghld.state`, `castghld.journal`) write through these.

Guarantees:
- Every file is 0600 from birth (`mkstemp`, or ``O_CREAT | O_EXCL`` with mode 0600), never
  written and then chmod-ed (a window with umask permissions).
- `atomic_write` creates the new file next to the one it replaces (`mkstemp`), fsyncs it, renames
  it with `os.replace` and fsyncs the directory: a crash leaves the old file or the new one, never
  a mix; a temporary file a crash left before its rename is removed at the next start
  (`remove_leftover_temp_files`).
- One process per state directory: `lock_directory` holds an exclusive ``flock`` that the kernel
  releases when the process dies (kill -9 included).
- `is_transient` tells the I/O failures a retry may not meet (the daemon exits 75 for them, so
  systemd restarts it) from the rest.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

log = logging.getLogger("castghld.state")

LOCK_FILENAME = "lock"
TEMP_PREFIX = ".tmp-"  # atomic_write's and the outbox compaction's files before their rename


class StateError(Exception):
    """The key file or state file cannot be used; the message names the file and the fix.
    `transient`: a retry later may succeed (an I/O error, a lock held by a process that exits)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


# I/O failures that a later try may not meet (a busy disk, a full table, a port not free yet):
# the daemon exits 75 (EX_TEMPFAIL) for them so systemd restarts it, and 2 for the rest.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ENOMEM,
        errno.ENOSPC,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.EADDRINUSE,
        errno.EADDRNOTAVAIL,
    }
)


def is_transient(error: BaseException) -> bool:
    """True for an OSError a retry may not meet, or a StateError made from one."""
    if isinstance(error, StateError):
        return error.transient
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS


def create_private_file(path: str, data: bytes) -> None:
    """Create `path` 0600 from birth with `data`; FileExistsError if it exists (no overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes | Callable[[Any], None]) -> None:
    """Replace `path` with `data` atomically (see module docstring); the file is 0600 throughout.

    `data` may be a callable that writes to the open binary file, for large payloads.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def remove_leftover_temp_files(directory: str) -> int:
    """Delete the temporary files a crash left before their rename (each may be a whole snapshot,
    so a crash loop would fill the disk); call it only while holding the directory's lock, when
    no write of ours is under way. Returns how many were removed."""
    removed = 0
    for name in os.listdir(directory):
        if name.startswith(TEMP_PREFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except FileNotFoundError:
                pass
    if removed:
        log.warning(
            "removed %d temporary file(s) left in %s by an interrupted write", removed, directory
        )
    return removed


def lock_directory(directory: str) -> int:
    """Hold an exclusive lock on `directory` for this process's life; the lock's descriptor.

    Two daemons on one state directory would each rewrite the state file and the outbox from their
    own memory, losing what the other acknowledged. The lock is released when the descriptor is
    closed or the process dies (kill -9 included), so a stale lock never blocks a restart.
    """
    path = os.path.join(directory, LOCK_FILENAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(
            f"{path}: cannot create the lock file: {e.strerror}", transient=is_transient(e)
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(
            f"{directory}: another castghld process is using this state directory",
            transient=True,
        ) from None
    return fd

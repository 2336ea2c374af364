"""Encrypted, atomically replaced state file, and the key ring that protects it.

Guarantees:
- The state file is AES-256-GCM encrypted with the newest key of `state.key_file`; every key in the
  file can decrypt (rotation: add a new first line, the next write re-encrypts with it).
- A write is atomic: a new file is created 0600 next to the old one (`mkstemp`), written, fsynced,
  renamed over the old one with `os.replace`, and the directory is fsynced. A crash at any point
  leaves either the old or the new file, never a torn one; a failed write leaves the old file and
  removes the temporary one.
- One writer at a time. Writes are coalesced: callers that commit while a write is running are
  served by the next write, which carries all their changes. Serialisation, encryption and fsync
  run on a worker thread, never on the IOLoop.
- A wrong key, a truncated or tampered file or a missing key file raise `StateError` naming the
  file, at load time; the store then refuses to write, so such a file is never overwritten.

Records are JSON values grouped in named sections (``installs``, ...). They are treated as
immutable: change a record by `put`-ting a new value, never by mutating one in place, so a
shallow snapshot taken on the IOLoop thread is safe to serialise on the worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from castghld.config import check_private_file

log = logging.getLogger("castghld.state")

STATE_FILENAME = "state.bin"
_MAGIC = b"CGS1"
_KEY_ID_LEN = 8
_NONCE_LEN = 12
_HEADER_LEN = len(_MAGIC) + _KEY_ID_LEN + _NONCE_LEN


class StateError(Exception):
    """The key file or state file cannot be used; the message names the file and the fix."""


class KeyRing:
    """AES-256-GCM keys from a key file: one base64 key per line, newest first."""

    def __init__(self, keys: list[bytes], path: str = "<memory>"):
        if not keys:
            raise StateError(f"{path}: key file holds no key (create one: castghld gen-key {path})")
        self.path = path
        self._keys = [(_key_id(k), AESGCM(k)) for k in keys]

    @classmethod
    def load(cls, path: str) -> KeyRing:
        try:
            check_private_file(path)
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise StateError(
                f"{path}: state key file does not exist (create it: castghld gen-key {path})"
            ) from None
        except ValueError as e:
            raise StateError(f"{path}: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"{path}: cannot read state key file: {e}") from None
        keys = []
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                key = base64.urlsafe_b64decode(line.encode("ascii"))
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != 32:
                raise StateError(
                    f"{path}: line {number} is not a state key (expected 32 bytes, base64; "
                    "make one with castghld gen-key)"
                )
            keys.append(key)
        return cls(keys, path)

    @property
    def key_ids(self) -> list[str]:
        return [key_id.hex() for key_id, _ in self._keys]

    def encrypt(self, plaintext: bytes, context: bytes = b"") -> bytes:
        key_id, aead = self._keys[0]
        nonce = os.urandom(_NONCE_LEN)
        header = _MAGIC + key_id + nonce
        return header + aead.encrypt(nonce, plaintext, header + context)

    def decrypt(self, blob: bytes, what: str, context: bytes = b"") -> bytes:
        """Plaintext of `blob`; StateError naming `what` if it is not ours, truncated or altered."""
        if len(blob) < _HEADER_LEN + 16 or not blob.startswith(_MAGIC):
            raise StateError(f"{what}: not a castghld encrypted file, or truncated")
        header = blob[:_HEADER_LEN]
        key_id = header[len(_MAGIC) : len(_MAGIC) + _KEY_ID_LEN]
        nonce = header[len(_MAGIC) + _KEY_ID_LEN :]
        for candidate_id, aead in self._keys:
            if candidate_id == key_id:
                try:
                    return aead.decrypt(nonce, blob[_HEADER_LEN:], header + context)
                except InvalidTag:
                    raise StateError(
                        f"{what}: authentication failed: the file is truncated or was altered"
                    ) from None
        raise StateError(
            f"{what}: encrypted with key {key_id.hex()}, which is not in {self.path} "
            f"(it holds {', '.join(self.key_ids)}); restore the old key as a later line"
        )

    def is_current(self, blob: bytes) -> bool:
        return blob[len(_MAGIC) : len(_MAGIC) + _KEY_ID_LEN] == self._keys[0][0]


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"castghld key id" + key).digest()[:_KEY_ID_LEN]


def new_key_line() -> str:
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)  # mkstemp creates it 0600
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


LOCK_FILENAME = "lock"


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
        raise StateError(f"{path}: cannot create the lock file: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(
            f"{directory}: another castghld process is using this state directory"
        ) from None
    return fd


class StateStore:
    """The daemon's durable records: load once at startup, then `put`/`delete` + `await commit()`.

    Nothing is durable until `commit()` returns: a caller that must not lose a change (a new token
    pair) awaits it before acting on the change.
    """

    def __init__(self, directory: str, keyring: KeyRing):
        self.directory = directory
        self.path = os.path.join(directory, STATE_FILENAME)
        self.keyring = keyring
        self._sections: dict[str, dict[str, Any]] = {}
        self._loaded = False
        self._version = 0  # bumped by every change
        self._durable_version = 0
        self._write_task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "castghld-state")
        self.last_write_seconds = 0.0
        self.write_count = 0

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Read and decrypt the state file (a missing file is an empty state)."""
        if not os.path.isdir(self.directory):
            raise StateError(
                f"{self.directory}: state directory does not exist (create it, mode 0700)"
            )
        try:
            with open(self.path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            self._sections = {}
            self._loaded = True
            return
        except OSError as e:
            raise StateError(f"{self.path}: cannot read state file: {e}") from None
        plaintext = self.keyring.decrypt(blob, self.path, context=b"state")
        try:
            doc = json.loads(plaintext)
            sections = doc["sections"]
            if not isinstance(sections, dict):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise StateError(
                f"{self.path}: decrypted, but the content is not castghld state"
            ) from None
        self._sections = sections
        self._loaded = True
        if not self.keyring.is_current(blob):
            # Rotation: the next write re-encrypts with the newest key; make sure there is one.
            self._version += 1
            log.info("state file uses an older key; it will be re-encrypted with the newest")

    # -- records -------------------------------------------------------------------------------

    def get(self, section: str, key: str) -> Any:
        return self._sections.get(section, {}).get(key)

    def items(self, section: str) -> Iterator[tuple[str, Any]]:
        return iter(list(self._sections.get(section, {}).items()))

    def count(self, section: str) -> int:
        return len(self._sections.get(section, {}))

    def put(self, section: str, key: str, value: Any) -> None:
        self._sections.setdefault(section, {})[key] = value
        self._version += 1

    def delete(self, section: str, key: str) -> bool:
        removed = self._sections.get(section, {}).pop(key, None) is not None
        if removed:
            self._version += 1
        return removed

    @property
    def dirty(self) -> bool:
        return self._version != self._durable_version

    # -- writing -------------------------------------------------------------------------------

    async def commit(self) -> None:
        """Return once every change made before this call is on disk (or raise OSError)."""
        if not self._loaded:
            raise StateError(f"{self.path}: state was not loaded; refusing to overwrite it")
        target = self._version
        while self._durable_version < target:
            if self._write_task is None or self._write_task.done():
                self._write_task = asyncio.ensure_future(self._write())
            await asyncio.shield(self._write_task)

    async def _write(self) -> None:
        version = self._version
        snapshot = {name: dict(records) for name, records in self._sections.items()}
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        await loop.run_in_executor(self._executor, self._write_snapshot, snapshot)
        self.last_write_seconds = time.monotonic() - started
        self.write_count += 1
        self._durable_version = max(self._durable_version, version)

    def _write_snapshot(self, snapshot: dict[str, dict[str, Any]]) -> None:
        plaintext = json.dumps({"format": 1, "sections": snapshot}, separators=(",", ":"))
        blob = self.keyring.encrypt(plaintext.encode("utf-8"), context=b"state")
        atomic_write(self.path, blob)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

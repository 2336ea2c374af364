"""The key ring that encrypts the state: AES-256-GCM keys from `state.key_file`.

Guarantees:
- Everything the daemon stores (the state file, its journals, the outbox) is encrypted with the
  newest key, the file's first line; every key in the file can decrypt (rotation: add a new first
  line, the next write re-encrypts with it).
- Each blob names its key (a hash of it, not the key) and is authenticated with the context the
  caller gives (file and position): a wrong key, a truncated, altered or moved blob is a
  `StateError` naming the file, never garbage.
- Rotation: a start under a key file whose first line is new re-encrypts the state and the outbox
  with it before serving (`StateStore.adopt_newest_key`, `Outbox.start`); the ids of the keys
  earlier starts used are kept in the state (`StateStore.key_history`), so a blob under one of
  them that the ring lacks is a key to put back (a startup error naming its id), not damage.
- A key file that is missing, not a regular file, readable by others, too large or not a key file
  is a `StateError` naming ``state.key_file``, the path and the fix.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from castghld.files import StateError, is_transient

# A key file is one ~45-byte line per key: anything larger is a wrong path, refused before it is
# read (reading a huge file would stall the start).
MAX_KEY_FILE = 64 * 1024
BLOB_MAGIC = b"CGS1"  # every encrypted blob starts with it
_KEY_ID_LEN = 8
_NONCE_LEN = 12
_HEADER_LEN = len(BLOB_MAGIC) + _KEY_ID_LEN + _NONCE_LEN


def key_file_error(path: str, problem: str, fix: str, transient: bool = False) -> StateError:
    """A StateError for the state key file: the config key, the path once, the problem, the fix."""
    return StateError(f"state.key_file {path}: {problem}; {fix}", transient)


class KeyRing:
    """AES-256-GCM keys from a key file: one base64 key per line, newest first."""

    def __init__(self, keys: list[bytes], path: str = "<memory>"):
        if not keys:
            raise key_file_error(
                path,
                "holds no key",
                f"restore it from a backup, or delete it and run: castghld gen-key {path}",
            )
        self.path = path
        self._keys = [(_key_id(k), AESGCM(k)) for k in keys]

    @classmethod
    def load(cls, path: str) -> KeyRing:
        """The keys of `path`. Every failure (missing, not a regular file, readable by others,
        unreadable, larger than `MAX_KEY_FILE`, not a key file, an empty file) is a StateError
        that names `state.key_file`, the path once and the fix; it is transient only for an I/O
        error a retry may not meet. Never blocks on a FIFO, never reads more than `MAX_KEY_FILE`
        bytes. A UTF-8 byte-order mark (an editor's) is ignored."""
        return cls(_parse_key_file(path, _read_key_file(path)), path)

    @property
    def key_ids(self) -> list[str]:
        return [key_id.hex() for key_id, _ in self._keys]

    def encrypt(self, plaintext: bytes, context: bytes = b"") -> bytes:
        key_id, aead = self._keys[0]
        nonce = os.urandom(_NONCE_LEN)
        header = BLOB_MAGIC + key_id + nonce
        return header + aead.encrypt(nonce, plaintext, header + context)

    def decrypt(self, blob: bytes, what: str, context: bytes = b"") -> bytes:
        """Plaintext of `blob`; StateError naming `what` if it is not ours, truncated or altered."""
        if len(blob) < _HEADER_LEN + 16 or not blob.startswith(BLOB_MAGIC):
            raise StateError(f"{what}: not a castghld encrypted file, or truncated")
        header = blob[:_HEADER_LEN]
        key_id = header[len(BLOB_MAGIC) : len(BLOB_MAGIC) + _KEY_ID_LEN]
        nonce = header[len(BLOB_MAGIC) + _KEY_ID_LEN :]
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

    def lacks_key_of(self, blob: bytes) -> bool:
        """True if `blob` is ours in form but names a key this ring does not hold (a config
        problem: an old key was dropped from the key file), not damage."""
        if len(blob) < _HEADER_LEN + 16 or not blob.startswith(BLOB_MAGIC):
            return False
        key_id = blob[len(BLOB_MAGIC) : len(BLOB_MAGIC) + _KEY_ID_LEN]
        return all(candidate_id != key_id for candidate_id, _ in self._keys)

    def is_current(self, blob: bytes) -> bool:
        return blob[len(BLOB_MAGIC) : len(BLOB_MAGIC) + _KEY_ID_LEN] == self._keys[0][0]


def key_id_of(blob: bytes) -> str:
    """The id (hex) of the key a blob names in its header: never the key, safe to log."""
    return blob[len(BLOB_MAGIC) : len(BLOB_MAGIC) + _KEY_ID_LEN].hex()


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"castghld key id" + key).digest()[:_KEY_ID_LEN]


def new_key_line() -> str:
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def _read_key_file(path: str) -> bytes:
    """The bytes of key file `path` (see `KeyRing.load` for what is refused)."""
    not_regular = key_file_error(
        path, "is not a regular file", "point state.key_file at a file made by castghld gen-key"
    )
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular
        if st.st_mode & 0o077:
            raise key_file_error(
                path,
                f"is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o})",
                f"run: chmod 600 {path}",
            )
        # Non-blocking: a FIFO swapped in after the stat must not hang serve or check-config.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise not_regular
            data = f.read(MAX_KEY_FILE + 1)
        if len(data) > MAX_KEY_FILE:
            raise key_file_error(
                path,
                f"is {st.st_size} bytes, not a state key file (at most {MAX_KEY_FILE} bytes: "
                "one line per key)",
                "point state.key_file at a file made by castghld gen-key",
            )
    except FileNotFoundError:
        raise key_file_error(
            path, "does not exist", f"create it: castghld gen-key {path}"
        ) from None
    except PermissionError:
        raise key_file_error(
            path,
            "cannot be read (permission denied)",
            "run castghld as the file's owner (the service user) or chown the file to it",
        ) from None
    except OSError as e:
        transient = is_transient(e)
        raise key_file_error(
            path,
            f"cannot be read ({e.strerror or e})",
            "retry once the I/O error is fixed" if transient else "check the path",
            transient=transient,
        ) from None
    return data


def _parse_key_file(path: str, data: bytes) -> list[bytes]:
    """The keys in `data`, read from `path`: one base64 key per line; blank and # lines skipped."""
    try:
        lines = data.removeprefix(codecs.BOM_UTF8).decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise key_file_error(
            path,
            "is not a state key file (not ASCII text)",
            "point state.key_file at a file made by castghld gen-key",
        ) from None
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
            raise key_file_error(
                path,
                f"line {number} is not a state key (expected 32 bytes, base64)",
                "restore the line from a backup of the key file, or replace it with the line "
                "of a new key (castghld gen-key NEW_PATH)",
            )
        keys.append(key)
    return keys

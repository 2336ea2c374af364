"""Why the state file uses AES-GCM: encrypt cost of a 10,000-installation state, Fernet vs ours.

Run: .venv/bin/python bench/cipher.py [installations]
Prints milliseconds per encrypt/decrypt for both and the ratio. Not part of the test suite.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import sys
import time

from cryptography.fernet import Fernet

from castghld.state import KeyRing


def state_of(installations: int) -> bytes:
    """A state file body shaped like tokens.py writes it (JWT-sized tokens)."""
    installs = {}
    for n in range(installations):
        location_id = f"loc{n:020d}"
        installs[location_id] = {
            "access_token": secrets.token_urlsafe(600),
            "refresh_token": secrets.token_urlsafe(300),
            "expires_at": time.time() + 86399,
            "company_id": f"comp{n % 50:020d}",
            "status": "ok",
            "installed_at": time.time(),
            "scope": "conversations/message.write conversations/message.readonly",
        }
    return json.dumps({"format": 1, "sections": {"installs": installs}}).encode()


def timed(fn, repeat: int = 7) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1000


def main() -> None:
    installations = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    plaintext = state_of(installations)
    fernet = Fernet(Fernet.generate_key())
    keyring = KeyRing([os.urandom(32)])
    fernet_blob = fernet.encrypt(plaintext)
    gcm_blob = keyring.encrypt(plaintext, b"state")
    results = {
        "fernet encrypt": timed(lambda: fernet.encrypt(plaintext)),
        "fernet decrypt": timed(lambda: fernet.decrypt(fernet_blob)),
        "aes-gcm encrypt": timed(lambda: keyring.encrypt(plaintext, b"state")),
        "aes-gcm decrypt": timed(lambda: keyring.decrypt(gcm_blob, "bench", b"state")),
    }
    print(f"state of {installations} installations: {len(plaintext) / 1e6:.1f} MB of JSON")
    for name, ms in results.items():
        print(f"  {name:<16} {ms:8.2f} ms")
    sizes = f"fernet {len(fernet_blob) / 1e6:.1f} MB (base64), aes-gcm {len(gcm_blob) / 1e6:.1f} MB"
    print(f"  file size: {sizes}")
    ratio = results["fernet encrypt"] / results["aes-gcm encrypt"]
    print(f"fernet / aes-gcm encrypt: {ratio:.0f}x")


if __name__ == "__main__":
    main()

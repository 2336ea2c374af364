"""GHL webhook signature verification on the raw request body.

Guarantees: ``verify`` never raises on attacker-controlled input; it answers which key type
accepted the body (``"ed25519"``, ``"rsa"`` or ``"ecdsa"``) or ``None``. A body is authentic only
if a signature header verifies against one of the keys we hold: GHL's published Ed25519 and RSA
keys (built in, ``castghld/keys``) plus the PEM files of ``ghl.webhook_public_keys``.

Headers: ``X-GHL-Signature`` carries a base64 Ed25519 signature (current scheme; when present it
alone decides); ``X-WH-Signature`` a base64 RSA-PKCS1v15-SHA256 signature (legacy, considered only
without ``X-GHL-Signature`` and while ``ghl.accept_legacy_rsa`` is true) or, for keys an operator
configured, an ECDSA-P256-SHA256 DER signature.
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import logging
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from castghld.metrics import Metrics

log = logging.getLogger("castghld.signatures")

PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey

ED25519_HEADER = "X-GHL-Signature"
LEGACY_HEADER = "X-WH-Signature"
# A base64 signature of any supported key is far below this; longer headers are not decoded.
MAX_SIGNATURE_CHARS = 2048
LEGACY_LOG_EVERY = 1000  # the first legacy signature is logged, then one in this many


class KeyFileError(Exception):
    """A configured public key file is missing, unreadable or not a supported PEM key."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


def parse_public_key(pem: bytes, source: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(source, f"not a PEM public key ({e})") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(source, f"ECDSA key on {key.curve.name}; only P-256 is supported")
    if not isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise KeyFileError(source, f"unsupported key type {type(key).__name__}")
    return key


def load_public_keys(paths: Iterable[str]) -> list[PublicKey]:
    keys = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise KeyFileError(path, e.strerror or str(e)) from None
        keys.append(parse_public_key(pem, path))
    return keys


def builtin_public_keys() -> list[PublicKey]:
    """GHL's published webhook keys, shipped as package data."""
    folder = importlib.resources.files("castghld") / "keys"
    keys = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".pem"):
            keys.append(parse_public_key(entry.read_bytes(), f"castghld/keys/{entry.name}"))
    return keys


def _decode_signature(value: str | None) -> bytes | None:
    if not value or len(value) > MAX_SIGNATURE_CHARS:
        return None
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


class SignatureVerifier:
    """Checks GHL's webhook signatures against every key we trust.

    The current scheme decides (SPEC §3): when ``X-GHL-Signature`` is present only Ed25519 keys
    are tried, and a signature that does not verify is refused even if an ``X-WH-Signature`` would.
    ``X-WH-Signature`` (RSA, or ECDSA for operator keys) is tried only when ``X-GHL-Signature`` is
    absent and `accept_legacy` is true; each body it accepts is counted
    (``castghld_webhooks{kind="signature",outcome="legacy_rsa"|"legacy_ecdsa"}``) and logged.
    The key that verified last is tried first, so a miss costs nothing in the common case.
    """

    def __init__(
        self,
        extra_keys: Iterable[PublicKey] = (),
        *,
        accept_legacy: bool = True,
        metrics: Metrics | None = None,
    ):
        self.keys: list[PublicKey] = [*builtin_public_keys(), *extra_keys]
        self._ed25519 = [k for k in self.keys if isinstance(k, ed25519.Ed25519PublicKey)]
        self._legacy = [
            k for k in self.keys if isinstance(k, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        ]
        self.accept_legacy = accept_legacy
        self.metrics = metrics
        self.legacy_accepted = 0

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str | None:
        if headers.get(ED25519_HEADER) is not None:
            signature = _decode_signature(headers.get(ED25519_HEADER))
            if signature is None:
                return None
            return "ed25519" if _first_verifying(self._ed25519, signature, body) else None
        if not self.accept_legacy:
            return None
        signature = _decode_signature(headers.get(LEGACY_HEADER))
        if signature is None:
            return None
        key = _first_verifying(self._legacy, signature, body)
        if key is None:
            return None
        scheme = "rsa" if isinstance(key, rsa.RSAPublicKey) else "ecdsa"
        self.legacy_accepted += 1
        if self.metrics is not None:
            self.metrics.webhooks.labels("signature", "legacy_" + scheme).inc()
        if self.legacy_accepted % LEGACY_LOG_EVERY == 1:
            log.warning(
                "webhook signed with the legacy X-WH-Signature (%s; %d so far): GHL retires it "
                "from 2026-07-01; set ghl.accept_legacy_rsa: false once GHL sends X-GHL-Signature",
                scheme,
                self.legacy_accepted,
                extra={"outcome": "legacy_signature", "reason": scheme},
            )
        return scheme


def _verifies(key: PublicKey, signature: bytes, body: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, body)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _first_verifying(keys: list[PublicKey], signature: bytes, body: bytes) -> PublicKey | None:
    """The key of `keys` that verifies, moved to the front (tried first next time), or None."""
    for index, key in enumerate(keys):
        if _verifies(key, signature, body):
            if index:
                keys.insert(0, keys.pop(index))
            return key
    return None

"""The secret key behind every keyed replacement (UIDs, pseudonyms, date offsets).

The same key gives the same output on every process and machine, which is
what keeps a study consistent when its instances pass through different
replicas or arrive days apart. There is no built-in key: it comes from a file
or from the ``DEID_GATEWAY_KEY`` environment variable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "DEID_GATEWAY_KEY"
MIN_KEY_BYTES = 32


class KeyLoadError(ValueError):
    """The key is missing, too short or unreadable."""


class SecretKey:
    """An HMAC-SHA256 key with domain separation between its uses.

    ``repr`` and ``str`` never show the key material.
    """

    __slots__ = ("_fingerprint", "_material")

    def __init__(self, material: bytes) -> None:
        if len(material) < MIN_KEY_BYTES:
            raise KeyLoadError(f"a key needs at least {MIN_KEY_BYTES} bytes, got {len(material)}")
        self._material = material
        self._fingerprint = hashlib.sha256(b"deid-gateway key fingerprint\0" + material).hexdigest()

    def digest(self, purpose: str, *parts: str) -> bytes:
        """Keyed digest of ``parts`` for one ``purpose`` (e.g. ``"uid"``, ``"patient"``).

        Parts are joined with a NUL separator, which no DICOM text value holds,
        so distinct inputs cannot collide by concatenation.
        """
        message = "\0".join((purpose, *parts)).encode("utf-8")
        return hmac.new(self._material, message, hashlib.sha256).digest()

    @property
    def fingerprint(self) -> str:
        """A non-secret identifier of the key (to tell keys apart in the audit trail)."""
        return self._fingerprint[:16]

    def __repr__(self) -> str:
        return f"SecretKey(fingerprint={self.fingerprint})"

    __str__ = __repr__


def _parse(text: bytes, source: str) -> SecretKey:
    stripped = text.strip()
    try:
        material = bytes.fromhex(stripped.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        material = stripped
    try:
        return SecretKey(material)
    except KeyLoadError as exc:
        raise KeyLoadError(f"{source}: {exc}") from None


def load_key(path: Path | None = None, environ: Mapping[str, str] | None = None) -> SecretKey:
    """Load the key from ``path`` or, without one, from ``DEID_GATEWAY_KEY``.

    A key is written as hexadecimal (at least 64 hex digits); any other
    content of at least 32 bytes is taken as raw key material.
    """
    if path is not None:
        try:
            return _parse(path.read_bytes(), str(path))
        except OSError as exc:
            raise KeyLoadError(f"cannot read key file {path}: {exc.strerror}") from None
    env = os.environ if environ is None else environ
    value = env.get(ENV_VAR)
    if not value:
        raise KeyLoadError(f"no key: give a key file or set {ENV_VAR}")
    return _parse(value.encode("utf-8"), ENV_VAR)


def generate_key_file(path: Path) -> SecretKey:
    """Create a new random key file, readable by its owner only.

    Fails if the file exists, so a key is never overwritten by accident:
    losing a key breaks the linkage of everything de-identified with it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    material = secrets.token_bytes(MIN_KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(material.hex() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return SecretKey(material)

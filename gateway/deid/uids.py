"""Keyed UID replacement.

A replaced UID is a function of the secret key and the original UID alone,
so the same original becomes the same replacement in every instance, process
and replica, and references between instances stay intact.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydicom._uid_dict import UID_dictionary

from gateway.deid.keys import SecretKey

#: UIDs under this root are defined by the DICOM standard itself.
STANDARD_ROOT = "1.2.840.10008."
MAX_UID_LENGTH = 64


_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_well_known(uid: str) -> bool:
    """True for UIDs of the standard's registry (SOP classes, transfer syntaxes,
    coding schemes, well-known frames of reference, ...), which identify no one.

    A value under the standard's root that is not a syntactically valid UID
    is not one of them, whatever it starts with.
    """
    return uid in UID_dictionary or (
        uid.startswith(STANDARD_ROOT) and len(uid) <= MAX_UID_LENGTH and bool(_UID_SYNTAX.fullmatch(uid))
    )


class UIDRemapper:
    """Replace UIDs by HMAC-SHA256 of the original under ``root``.

    Under the default root ``2.25`` the replacement is the decimal form of a
    128-bit value laid out as an RFC 9562 version 8 (custom) UUID, as PS3.5
    B.2 describes for UUID-derived UIDs. Under another root, as many decimal
    digits as fit in 64 characters are used.
    """

    def __init__(self, key: SecretKey, root: str = "2.25") -> None:
        root = root.rstrip(".")
        if not root or len(root) > MAX_UID_LENGTH - 20:
            raise ValueError(f"UID root {root!r} leaves too little room for a unique suffix")
        self._key = key
        self._root = root
        self._remap = lru_cache(maxsize=65536)(self._compute)

    def _compute(self, uid: str) -> str:
        digest = bytearray(self._key.digest("uid", uid)[:16])
        if self._root == "2.25":
            digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
            digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 9562 variant
            return f"2.25.{int.from_bytes(digest, 'big')}"
        room = MAX_UID_LENGTH - len(self._root) - 1
        suffix = int.from_bytes(digest, "big") % (10 ** min(room, 38))
        return f"{self._root}.{suffix or 1}"

    def remap(self, uid: str) -> str:
        """Return the replacement of ``uid``; well-known UIDs are kept."""
        uid = uid.strip("\0 ")
        if not uid or is_well_known(uid):
            return uid
        return self._remap(uid)

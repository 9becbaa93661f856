"""Dummy values (action D) and empty values (action Z), valid for each VR."""

from __future__ import annotations

from typing import Any

#: A non-empty value that identifies no one, per VR (PS3.5 Table 6.2-1 limits).
_DUMMY: dict[str, Any] = {
    "AE": "ANONYMOUS",
    "AS": "000D",
    "AT": 0,
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "FD": 0.0,
    "FL": 0.0,
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "SL": 0,
    "SS": 0,
    "ST": "ANONYMIZED",
    "SV": 0,
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UL": 0,
    "UR": "urn:anonymized",
    "US": 0,
    "UT": "ANONYMIZED",
    "UV": 0,
}

_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

#: Maximum value length in characters for the VRs that have one.
MAX_LENGTH: dict[str, int] = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
    "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64,
}  # fmt: skip


def dummy_value(vr: str) -> Any:
    """A non-empty dummy value for ``vr`` (not for SQ or UI, which are handled
    by structure and by UID remapping)."""
    if vr in _BINARY:
        return b"\x00\x00"
    return _DUMMY.get(vr, "ANONYMIZED")


def empty_value(vr: str) -> Any:
    """The zero-length value pydicom writes for ``vr``."""
    if vr == "SQ":
        return []
    if vr in _BINARY:
        return b""
    return None

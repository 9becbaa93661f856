"""The de-identification engine: PS3.15 Annex E profiles as data, applied to
datasets (pure) and to files (streaming the pixel data through).

The names below are imported on first use, so that a process which needs
only a light part of the package (the receiver's structure check,
:mod:`gateway.deid.stream`) does not load the engine and its tables.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.deid.engine import Deidentifier, Redactor
    from gateway.deid.keys import KeyLoadError, SecretKey, generate_key_file, load_key
    from gateway.deid.profile import Profile, ProfileError, load_profile
    from gateway.deid.report import DeidReport, ExplainEntry, Outcome

_EXPORTS = {
    "DeidReport": "report",
    "Deidentifier": "engine",
    "ExplainEntry": "report",
    "KeyLoadError": "keys",
    "Outcome": "report",
    "Profile": "profile",
    "ProfileError": "profile",
    "Redactor": "engine",
    "SecretKey": "keys",
    "generate_key_file": "keys",
    "load_key": "keys",
    "load_profile": "profile",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "DeidReport",
    "Deidentifier",
    "ExplainEntry",
    "KeyLoadError",
    "Outcome",
    "Profile",
    "ProfileError",
    "Redactor",
    "SecretKey",
    "generate_key_file",
    "load_key",
    "load_profile",
]

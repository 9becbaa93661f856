"""The de-identification engine: PS3.15 Annex E profiles as data, applied to
datasets (pure) and to files (streaming the pixel data through)."""

from gateway.deid.engine import Deidentifier, Redactor
from gateway.deid.keys import KeyLoadError, SecretKey, generate_key_file, load_key
from gateway.deid.profile import Profile, ProfileError, load_profile
from gateway.deid.report import DeidReport, ExplainEntry, Outcome

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

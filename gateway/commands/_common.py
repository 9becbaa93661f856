"""Options and loading shared by the commands that de-identify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.deid import Deidentifier, ProfileError, load_key, load_profile
from gateway.deid.keys import ENV_VAR, KeyLoadError
from gateway.deid.pseudonyms import PatientLookupError


def add_profile_options(parser: argparse.ArgumentParser, *, key: bool = True) -> None:
    """Add ``--profile`` (and ``--key-file``) to a parser."""
    parser.add_argument(
        "--profile", default="research", metavar="NAME|PATH",
        help="a built-in profile (basic, research) or a profile YAML file (default: research)",
    )  # fmt: skip
    if key:
        parser.add_argument(
            "--key-file", type=Path, default=None, metavar="FILE",
            help=f"secret key file (default: the {ENV_VAR} environment variable)",
        )  # fmt: skip


def build_deidentifier(prog: str, profile: str, key_file: Path | None) -> Deidentifier | None:
    """Load profile and key; print a one-line error and return None on failure."""
    try:
        loaded = load_profile(profile)
        key = load_key(key_file)
        return Deidentifier(loaded, key)
    except (ProfileError, KeyLoadError, PatientLookupError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def iter_inputs(inputs: list[Path]) -> list[Path]:
    """Files named, and every file below folders named, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()))
        else:
            files.append(item)
    return files

"""``deid-gateway explain``: show what a profile does to each element of a file.

Prints tag, keyword, VR, action and the rule that chose it, never a value.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.commands._common import add_profile_options
from gateway.deid import Deidentifier, Outcome, ProfileError, SecretKey, load_profile


def register(subparsers: Any) -> None:
    """Add the ``explain`` sub-command."""
    parser = subparsers.add_parser(
        "explain",
        help="show, element by element, the action a profile takes and why",
        description="Print each element's path, tag, keyword, VR, action and rule. Values are never printed.",
    )
    add_profile_options(parser, key=False)
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"deid-gateway explain: {exc}", file=sys.stderr)
        return 2
    try:
        dataset = pydicom.dcmread(args.file, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        print(f"deid-gateway explain: {args.file}: not a readable DICOM file ({type(exc).__name__})",
              file=sys.stderr)  # fmt: skip
        return 1
    # Actions do not depend on the key; a throwaway key keeps real keys out of reach.
    deid = Deidentifier(profile, SecretKey(secrets.token_bytes(32)))
    report = deid.deidentify(dataset, has_pixels=True, explain=True)
    print(f"profile {profile.name} (sha256:{profile.content_hash[:16]})")
    if report.outcome is not Outcome.PASSED:
        print(f"instance {report.outcome.value}: {report.reason}: {report.detail}")
    width = min(max((len(e.path) for e in report.explain), default=4), 72)
    for entry in report.explain:
        print(f"{entry.path:<{width}}  {entry.tag}  {entry.vr:<2}  {entry.action:<18}  {entry.rule}")
    return 0

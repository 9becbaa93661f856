"""``deid-gateway verify``: check a finished batch for identifying values.

Harvests the identifying values of every input instance (names and their
components, IDs, accession, container, specimen and barcode identifiers,
label text, dates in their written forms, institution names, every UID that
is not a standard one) and searches every element of every output instance
for any of them. Prints a summary: instances checked, hits by attribute path
(never a value) and the attributes no profile rule addresses, by tag path.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.commands._common import add_profile_options, iter_inputs
from gateway.deid import Deidentifier, ProfileError, SecretKey, load_profile
from gateway.deid.harvest import IdentifyingValues, harvest
from gateway.deid.uids import is_well_known
from gateway.deid.verify import OutputScanner

_READ_ERRORS = (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError)


def register(subparsers: Any) -> None:
    """Add the ``verify`` sub-command."""
    parser = subparsers.add_parser(
        "verify",
        help="search a de-identified batch for the identifying values of its inputs",
        description=__doc__,
    )
    add_profile_options(parser, key=False)
    parser.add_argument("--input-dir", type=Path, required=True, metavar="IN")
    parser.add_argument("--output-dir", type=Path, required=True, metavar="OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command; exit 1 when any output holds an identifying value."""
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        print(f"deid-gateway verify: {exc}", file=sys.stderr)
        return 2
    engine = Deidentifier(profile, SecretKey(secrets.token_bytes(32)))
    found = IdentifyingValues()
    unaddressed: Counter[str] = Counter()
    inputs = unreadable = 0
    for path in iter_inputs([args.input_dir]):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except _READ_ERRORS:
            unreadable += 1
            continue
        inputs += 1
        found.update(harvest(dataset))
        report = engine.deidentify(dataset, has_pixels=True, explain=True)
        unaddressed.update(report.unaddressed)
    uids = {u for u in found.uids if not is_well_known(u)}
    if "retain_uids" in profile.options:
        uids = set()
    scanner = OutputScanner(
        found,
        uids,
        institutions="retain_institution_identity" not in profile.options,
        devices="retain_device_identity" not in profile.options,
        dates=profile.dates_mode != "full",
        dates_in_date_elements=False,
    )
    hits: Counter[str] = Counter()
    outputs = flagged = 0
    for path in iter_inputs([args.output_dir]):
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except _READ_ERRORS:
            continue
        outputs += 1
        findings = scanner.scan(dataset)
        flagged += bool(findings)
        hits.update(f"{f.path} ({f.kind})" for f in findings)
    print(f"inputs checked:     {inputs}" + (f" ({unreadable} unreadable)" if unreadable else ""))
    print(f"outputs checked:    {outputs}")
    print(f"outputs with hits:  {flagged}")
    for where, count in sorted(hits.items()):
        print(f"  hit  {count:6d}  {where}")
    print(f"unaddressed attributes (profile {profile.name}): {len(unaddressed)}")
    for where, count in sorted(unaddressed.items()):
        print(f"  {count:6d}  {where}")
    return 1 if flagged else 0

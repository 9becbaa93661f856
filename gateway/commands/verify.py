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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from gateway.commands._common import add_profile_options, iter_inputs
from gateway.deid import Deidentifier, ProfileError, SecretKey, load_profile
from gateway.deid.harvest import IdentifyingValues, harvest
from gateway.deid.verify import scanner_for

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
    for dataset in _headers(args.input_dir):
        if dataset is None:
            unreadable += 1
            continue
        inputs += 1
        found.update(harvest(dataset))
        report = engine.deidentify(dataset, has_pixels=True, explain=True)
        unaddressed.update(report.unaddressed)
    scanner = scanner_for(profile, found, batch=True)
    hits: Counter[str] = Counter()
    outputs = flagged = 0
    for dataset in _headers(args.output_dir):
        if dataset is None:
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


def _headers(folder: Path) -> Iterator[Dataset | None]:
    """Every file's header below ``folder``; ``None`` for one that is not DICOM."""
    for path in iter_inputs([folder]):
        try:
            yield pydicom.dcmread(path, stop_before_pixels=True)
        except _READ_ERRORS:
            yield None

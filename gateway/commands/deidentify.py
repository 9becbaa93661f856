"""``deid-gateway deidentify``: de-identify files and folders with a profile."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gateway.commands._common import add_profile_options, build_deidentifier, iter_inputs
from gateway.deid import DeidReport, Outcome
from gateway.deid.mapping import MappingWriter

#: Exit status when every input was passed or dropped by policy.
EXIT_OK = 0
#: Exit status when the profile or key could not be loaded.
EXIT_SETUP = 2
#: Exit status when at least one input was quarantined or unreadable.
EXIT_QUARANTINED = 3


def register(subparsers: Any) -> None:
    """Add the ``deidentify`` sub-command."""
    parser = subparsers.add_parser(
        "deidentify",
        help="de-identify DICOM files and folders",
        description=(
            "De-identify every DICOM file named or found below the folders named. "
            "Passed instances are written to OUTPUT/<study>/<series>/<instance>.dcm under "
            "their new UIDs; dropped ones (e.g. LABEL images) are not written; quarantined "
            "and unreadable ones are copied to --quarantine when given. "
            f"Exit status: {EXIT_OK} all passed or dropped, {EXIT_SETUP} bad profile or key, "
            f"{EXIT_QUARANTINED} some input quarantined."
        ),
    )
    add_profile_options(parser)
    parser.add_argument("--output", type=Path, required=True, metavar="DIR")
    parser.add_argument("--quarantine", type=Path, default=None, metavar="DIR")
    parser.add_argument("--report", type=Path, default=None, metavar="FILE.json")
    parser.add_argument(
        "--mapping-dir", type=Path, default=None, metavar="DIR",
        help="write uid_mapping.csv and patient_id_mapping.csv (id_old,id_new) here, "
        "owner-readable only; keep it apart from the research output",
    )  # fmt: skip
    parser.add_argument("inputs", type=Path, nargs="+", metavar="INPUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    deid = build_deidentifier("deid-gateway deidentify", args.profile, args.key_file)
    if deid is None:
        return EXIT_SETUP
    files = iter_inputs(args.inputs)
    args.output.mkdir(parents=True, exist_ok=True)
    staging = args.output / ".incoming"
    staging.mkdir(exist_ok=True)
    mapping = MappingWriter(args.mapping_dir) if args.mapping_dir is not None else None
    entries: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    progress = tqdm(files, unit="file", disable=not sys.stderr.isatty() or len(files) < 2)
    for index, src in enumerate(progress):
        staged = staging / f"{os.getpid()}-{index}.dcm"
        report = deid.deidentify_file(src, staged)
        entry: dict[str, Any] = {"input": str(src), **report.public()}
        if report.outcome is Outcome.PASSED:
            entry["output"] = str(_place(staged, args.output, report))
            if mapping is not None:
                mapping.add(report)
        elif args.quarantine is not None and report.outcome is Outcome.QUARANTINED:
            copy = _quarantine(src, args.quarantine, report)
            if copy is not None:
                entry["quarantined_copy"] = str(copy)
        outcomes[report.outcome.value] += 1
        entries.append(entry)
    shutil.rmtree(staging, ignore_errors=True)
    summary = ", ".join(f"{count} {name}" for name, count in sorted(outcomes.items()))
    print(f"{len(files)} input(s): {summary or 'none'}", file=sys.stderr)
    if args.report is not None:
        args.report.write_text(
            json.dumps({"profile": deid.profile.name, "inputs": entries}, indent=2) + "\n",
            encoding="utf-8",
        )
    return EXIT_QUARANTINED if outcomes[Outcome.QUARANTINED.value] else EXIT_OK


def _place(staged: Path, output: Path, report: DeidReport) -> Path:
    folder = (
        output
        / (report.new_study_instance_uid or "no-study")
        / (report.new_series_instance_uid or "no-series")
    )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{report.new_sop_instance_uid}.dcm"
    staged.replace(target)
    return target


def _quarantine(src: Path, folder: Path, report: DeidReport) -> Path | None:
    """Keep the original (it carries PHI: owner-only) with its reason beside it;
    ``None`` when the input cannot be read to be copied."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    digest = hashlib.sha256()
    try:
        with src.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        target = folder / f"{digest.hexdigest()[:32]}.dcm"
        shutil.copyfile(src, target)
    except OSError:
        return None
    target.chmod(0o600)
    reason = target.with_suffix(".json")
    reason.write_text(json.dumps(report.public(), indent=2) + "\n", encoding="utf-8")
    reason.chmod(0o600)
    return target

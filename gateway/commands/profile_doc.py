"""``deid-gateway profile-doc``: the profile reference, generated from the profiles.

For every row of PS3.15 Table E.1-1 it builds a probe instance holding that
attribute, de-identifies it with each profile and reads the action and rule
from the engine's own explanation, so the document says what the engine does
rather than what someone thought it does. ``docs/profile-reference.md`` is
this command's output for the built-in profiles; a test regenerates it.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, VLWholeSlideMicroscopyImageStorage

from gateway.deid import Deidentifier, Profile, ProfileError, SecretKey, load_profile
from gateway.deid.profile import builtin_profiles
from gateway.deid.standard import (
    OPTION_COLUMNS,
    TableRow,
    TagPattern,
    confidentiality_table,
    safe_private_attributes,
)

#: Every probe is an instance of this SOP Class, at the top level: compound
#: codes resolve from the attribute's Type in its IOD.
PROBE_SOP_CLASS = VLWholeSlideMicroscopyImageStorage
_PROBE_UID = "2.25.1"
_PRIVATE_CREATOR = "EXAMPLE PRIVATE 1.0"

#: A value of each VR, so that the probe element is well formed.
_VALUES: dict[str, Any] = {
    "DA": "20200101", "DT": "20200101120000", "TM": "120000", "PN": "Probe^Value",
    "UI": "2.25.2", "AS": "042Y", "CS": "PROBE", "DS": "1", "IS": "1", "AT": 0x00100010,
    "US": 1, "SS": 1, "UL": 1, "SL": 1, "FL": 1.0, "FD": 1.0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "UN": b"\x00\x00", "OF": b"\x00" * 4,
}  # fmt: skip

_ACTIONS = {
    "D": "replaced by a dummy value (or a keyed pseudonym, where a rule says so)",
    "Z": "emptied (zero length)",
    "X": "removed",
    "K": "kept",
    "C": "cleaned: identifying text removed, dates shifted by the patient's offset",
    "U": "replaced by a keyed UID (the same original gives the same new UID everywhere)",
    "replace": "replaced by the value the rule gives",
    "hash": "replaced by a keyed hash of the value",
    "date_shift": "shifted by the patient's date offset",
    "pseudonym": "replaced by the keyed subject pseudonym",
    "slide_pseudonym": "replaced by the keyed slide (container) pseudonym",
    "specimen_pseudonym": "replaced by the keyed specimen pseudonym",
}


def register(subparsers: Any) -> None:
    """Add the ``profile-doc`` sub-command."""
    parser = subparsers.add_parser(
        "profile-doc",
        help="write the profile reference (every attribute, its action and rule) as Markdown",
        description="Generate the profile reference from the profile files and the engine: for "
        "every Table E.1-1 attribute, the action each profile takes and the rule behind it.",
    )
    parser.add_argument(
        "--profile", action="append", default=None, metavar="NAME|PATH",
        help="a profile to document (repeatable; default: every built-in profile)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, metavar="FILE", help="default: stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the command."""
    names: list[str] = args.profile or sorted(builtin_profiles())
    try:
        profiles = [load_profile(name) for name in names]
    except ProfileError as exc:
        print(f"deid-gateway profile-doc: {exc}", file=sys.stderr)
        return 2
    text = render(profiles)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


# ------------------------------------------------------------------ probing


def _probe_vr(tag: int, name: str) -> tuple[str, bool]:
    """The VR of a probe element; ``True`` when pydicom's dictionary does not
    know the attribute and the VR is inferred from its name."""
    if dictionary_has_tag(tag) or (tag >> 16) in range(0x5000, 0x6020):
        try:
            return dictionary_VR(tag).split(" or ")[0], False
        except KeyError:
            pass
    for suffix, vr in (("DateTime", "DT"), ("Date", "DA"), ("Time", "TM"), ("Sequence", "SQ"),
                       ("URI", "UR"), ("Comment", "LT"), ("Comments", "LT")):  # fmt: skip
        if name.endswith(suffix):
            return vr, True
    return "LO", True


def _add(dataset: Dataset, tag: int, vr: str) -> None:
    if vr == "SQ":
        dataset.add_new(tag, vr, DicomSequence([]))
    else:
        dataset.add_new(tag, vr, _VALUES.get(vr, "PROBE"))


def _base() -> Dataset:
    dataset = Dataset()
    dataset.SOPClassUID = PROBE_SOP_CLASS
    dataset.SOPInstanceUID = _PROBE_UID
    return dataset


def _probe_tag(row: TableRow) -> int:
    if row.pattern is TagPattern.OVERLAY:
        return 0x60000000 | row.tag
    if row.pattern is TagPattern.CURVE:
        return 0x50000005  # Curve Dimensions, one element of the repeating group
    return row.tag


def _decision(deid: Deidentifier, dataset: Dataset, tag: int) -> tuple[str, str]:
    """De-identify the probe and return the (action, rule) explained for ``tag``."""
    report = deid.deidentify(dataset, has_pixels=False, explain=True)
    wanted = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    for entry in report.explain:
        if entry.tag == wanted and "[" not in entry.path:
            return entry.action, entry.rule
    raise RuntimeError(f"the engine did not explain {wanted} for profile {deid.profile.name}")


class _Prober:
    """One profile's engine with a throwaway key: actions never depend on the key."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.deid = Deidentifier(profile, SecretKey(secrets.token_bytes(32)))

    def public(self, tag: int, vr: str) -> tuple[str, str]:
        dataset = _base()
        if tag not in dataset:
            _add(dataset, tag, vr)
        return _decision(self.deid, dataset, tag)

    def private(self, creator: str, group: int, element: int, vr: str) -> tuple[str, str]:
        dataset = _base()
        dataset.add_new((group << 16) | 0x0010, "LO", creator)
        tag = (group << 16) | 0x1000 | element
        _add(dataset, tag, vr)
        return _decision(self.deid, dataset, tag)


# ---------------------------------------------------------------- rendering


def _short_rule(rule: str, row: TableRow | None, sources: dict[str, str]) -> str:
    """The rule without what the row already says; profile paths made relative."""
    if row is not None:
        rule = rule.removeprefix(f"Table E.1-1 {row.tag_text} {row.name}: ")
    match = re.match(r"profile (.+?:\d+): ", rule)
    if match:
        path, _, line = match.group(1).rpartition(":")
        return f"rule {sources.get(path, Path(path).name)}:{line}"
    return rule


def _table_code(row: TableRow) -> str:
    options = "; ".join(f"{o}: {c}" for o, c in row.options.items())
    return f"{row.basic}" + (f" ({options})" if options else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sources(profiles: Sequence[Profile]) -> dict[str, str]:
    """Profile file paths as the repository names them (``profiles/basic.yaml``)."""
    builtin = {str(path): f"profiles/{path.name}" for path in builtin_profiles().values()}
    return {src: builtin.get(src, Path(src).name) for p in profiles for src in p.sources}


def _profile_section(profile: Profile, sources: dict[str, str]) -> list[str]:
    pixels = profile.pixels
    shift = (
        f", shifted by a keyed per-patient offset in {list(profile.date_shift_days)} days"
        if profile.dates_mode == "modified"
        else ""
    )
    lines = [
        f"### {profile.name}",
        "",
        profile.description.strip(),
        "",
        f"- files: {', '.join(f'`{sources[s]}`' for s in profile.sources)}",
        f"- content SHA-256: `{profile.content_hash}`",
        f"- options: {', '.join(f'`{o}`' for o in OPTION_COLUMNS if o in profile.options) or 'none'}",
        f"- dates: `{profile.dates_mode}`{shift}",
        f"- UID root of new UIDs: `{profile.uid_root}`",
        f"- OVERVIEW images: `{pixels.overview}`; burned-in annotation: `{pixels.burned_in}`; "
        f"OCR check: `{'on' if pixels.ocr else 'off'}`",
        f"- THUMBNAIL images: `{pixels.thumbnail}`; SOP Classes dropped: "
        f"{', '.join(f'`{UID(u).name}`' for u in sorted(pixels.drop_sop_classes)) or 'none'}",
        f"- attributes outside the data dictionary, and private ones nothing keeps: "
        f"`{profile.unknown_attributes}`",
        f"- standard attributes Table E.1-1 does not list: `{profile.unknown_standard_attributes}`",
        f"- private creators kept whole: "
        f"{', '.join(f'`{c}`' for c in sorted(profile.keep_private_creators)) or 'none'}",
        f"- patient lookup: {'`' + str(profile.patient_lookup) + '`' if profile.patient_lookup else 'none'}"
        + (" (required)" if profile.patient_lookup_required else ""),
    ]
    if profile.clean_patterns:
        lines.append("- cleaning patterns (removed from free text wherever found):")
        lines.extend(f"  - `{p.pattern}`" for p in profile.clean_patterns)
    if profile.rules:
        lines += ["", "Rules:", "", "| attribute | action | rule | why |", "| --- | --- | --- | --- |"]
        for key, rule in profile.rules.items():
            if isinstance(key, int):
                name = keyword_for_tag(key) or f"({key >> 16:04X},{key & 0xFFFF:04X})"
            else:
                name = f"({key[1]:04X},xx{key[2]:02X}) {key[0]}"
            where = _short_rule(f"profile {rule.source}: ", None, sources)
            lines.append(f"| {name} | `{rule.action}` | {where} | {_cell(' '.join(rule.why.split()))} |")
    return [*lines, ""]


def render(profiles: Sequence[Profile]) -> str:
    """The whole reference, as Markdown."""
    probers = [_Prober(p) for p in profiles]
    sources = _sources(profiles)
    names = ", ".join(f"`{p.name}`" for p in profiles)
    out = [
        "# Profile reference",
        "",
        "<!-- Generated by `deid-gateway profile-doc`; do not edit by hand. "
        "tests/test_docs.py fails when this file and the profiles disagree. -->",
        "",
        f"What each profile ({names}) does to every attribute of DICOM PS3.15 Table E.1-1, and",
        "the rule that decides it. Each line comes from the engine itself: an instance holding",
        "the attribute is de-identified and the engine's explanation (`deid-gateway explain`)",
        "is read back. The probe is a VL Whole Slide Microscopy Image and the attribute sits at",
        "the top level, so compound codes (`X/Z`, `X/D`, `Z/D`, `X/Z/D`, `X/Z/U*`) are resolved",
        "from the attribute's Type in that IOD; in another IOD, or inside a sequence, the same",
        "code can resolve differently. Run `deid-gateway explain --profile NAME FILE` to see the",
        "decision for each element of a real file.",
        "",
        "Regenerate with `deid-gateway profile-doc --output docs/profile-reference.md`. How",
        "actions are chosen is explained in [profiles.md](profiles.md).",
        "",
        "## Actions",
        "",
        "| action | effect |",
        "| --- | --- |",
        *(f"| `{code}` | {text} |" for code, text in _ACTIONS.items()),
        "",
        "## Profiles",
        "",
    ]
    for profile in profiles:
        out += _profile_section(profile, sources)
    header = "| tag | attribute | Table E.1-1 | " + " | ".join(p.name for p in profiles) + " |"
    out += [
        "## Table E.1-1 attributes",
        "",
        "Table E.1-1 gives the Basic Profile's code and, in brackets, the code of each option",
        "column that names the attribute. Each profile column gives the action taken and why:",
        "the Basic Profile's code, the option whose code won (the most protective of the",
        "enabled options), or the profile rule (file and line) that overrides the table.",
        "Attributes marked † are not in pydicom's data dictionary; they were probed with a",
        "VR inferred from the name.",
        "",
        header,
        "| --- | --- | --- | " + " | ".join("---" for _ in profiles) + " |",
    ]
    for row in confidentiality_table().rows:
        if row.pattern is TagPattern.PRIVATE:
            continue
        tag = _probe_tag(row)
        vr, inferred = _probe_vr(tag, row.name)
        cells = []
        for prober in probers:
            action, rule = prober.public(tag, vr)
            cells.append(f"`{action}` {_cell(_short_rule(rule, row, sources))}")
        name = row.name + (" (retired)" if row.retired else "") + (" †" if inferred else "")
        out.append(f"| {row.tag_text} | {name} | `{_table_code(row)}` | " + " | ".join(cells) + " |")
    out += _others(probers, sources)
    return "\n".join(out) + "\n"


#: Attributes outside Table E.1-1, one of each kind the engine treats apart.
_OTHER_PROBES: tuple[tuple[str, int, str], ...] = (
    ("a UID", 0x00081150, "UI"),
    ("a date", 0x00141020, "DA"),
    ("a person's name", 0x00142006, "PN"),
    ("a text attribute", 0x00080070, "LO"),
    ("a coded string", 0x00080008, "CS"),
    ("a number", 0x00480006, "UL"),
    ("a public tag no dictionary knows", 0x0070FFF0, "LO"),
)


def _others(probers: Sequence[_Prober], sources: dict[str, str]) -> list[str]:
    """Attributes the table does not list, and private attributes."""
    columns = " | ".join(p.profile.name for p in probers)
    rule = "| --- | --- | --- | " + " | ".join("---" for _ in probers) + " |"
    out = [
        "",
        "## Attributes not in Table E.1-1",
        "",
        "One example of each kind of attribute the engine treats apart when no rule and no",
        "table row addresses it.",
        "",
        f"| kind | example | VR | {columns} |",
        rule,
    ]
    for kind, tag, vr in _OTHER_PROBES:
        keyword = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        cells = " | ".join(f"`{a}` {_cell(_short_rule(r, None, sources))}" for a, r in
                           (p.public(tag, vr) for p in probers))  # fmt: skip
        out.append(f"| {kind} | {keyword} | {vr} | {cells} |")
    safe = min(safe_private_attributes().items())[1]
    private_probes = (
        (f"creator `{_PRIVATE_CREATOR}`, not in Table E.3.10-1", _PRIVATE_CREATOR, 0x0009, 0x01, "LO"),
        (
            f"Table E.3.10-1: `{safe.private_creator}` "
            f"({safe.group:04X},xx{safe.element:02X}) {safe.meaning}",
            safe.private_creator, safe.group, safe.element, safe.vr.split(" or ")[0] or "LO",
        ),
    )  # fmt: skip
    out += [
        "",
        "## Private attributes",
        "",
        "Private elements are removed unless their creator is kept by the profile",
        "(`private: keep_creators`), a rule names them, or Retain Safe Private is on and",
        f"Table E.3.10-1 lists them ({len(safe_private_attributes())} entries in",
        "`profiles/ps315/safe-private.csv`). Elements without a private creator are removed.",
        "",
        f"| element | {columns} |",
        "| --- | " + " | ".join("---" for _ in probers) + " |",
    ]
    for label, creator, group, element, vr in private_probes:
        cells = " | ".join(f"`{a}` {_cell(_short_rule(r, None, sources))}" for a, r in
                           (p.private(creator, group, element, vr) for p in probers))  # fmt: skip
        out.append(f"| {_cell(label)} | {cells} |")
    return out

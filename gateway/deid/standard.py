"""DICOM PS3.15 Annex E tables, loaded from the CSV copies in ``profiles/ps315``.

The standard is never retyped here: Table E.1-1 (Application Level
Confidentiality Profile Attributes) and Table E.3.10-1 (Safe Private
Attributes) are read from the files whose provenance is documented in
``profiles/ps315/README.md``.
"""

from __future__ import annotations

import csv
import enum
import io
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

#: The option columns of Table E.1-1, in the standard's order.
OPTION_COLUMNS: tuple[str, ...] = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)

#: Every action code Table E.1-1 uses (Table E.1-1a).
ACTION_CODES: frozenset[str] = frozenset(
    {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
)


class TagPattern(enum.Enum):
    """How a table row's tag matches data elements."""

    EXACT = "exact"
    CURVE = "curve"  # (50xx,xxxx): every element of the even groups 5000-501E
    OVERLAY = "overlay"  # (60xx,eeee): one element in each even group 6000-601E
    PRIVATE = "private"  # (gggg,eeee) where gggg is odd


@dataclass(frozen=True, slots=True)
class TableRow:
    """One row of Table E.1-1."""

    tag_text: str
    name: str
    pattern: TagPattern
    tag: int  # the exact tag; for OVERLAY the element number; 0 otherwise
    retired: bool
    in_standard_iod: bool
    basic: str
    options: dict[str, str]


_EXACT = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")
_OVERLAY = re.compile(r"^\(60xx,([0-9A-F]{4})\)$")


def _parse_tag(text: str) -> tuple[TagPattern, int]:
    if m := _EXACT.match(text):
        return TagPattern.EXACT, int(m.group(1) + m.group(2), 16)
    if m := _OVERLAY.match(text):
        return TagPattern.OVERLAY, int(m.group(1), 16)
    if text == "(50xx,xxxx)":
        return TagPattern.CURVE, 0
    if text.startswith("(gggg,eeee)") and "odd" in text:
        return TagPattern.PRIVATE, 0
    raise ValueError(f"Table E.1-1: unrecognised tag notation {text!r}")


def _read_csv(name: str) -> list[dict[str, str]]:
    source = resources.files("gateway.profiles").joinpath("ps315").joinpath(name)
    with source.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass(frozen=True, slots=True)
class ConfidentialityTable:
    """Table E.1-1 indexed for lookup by tag."""

    rows: tuple[TableRow, ...]
    by_tag: dict[int, TableRow]
    overlay_by_element: dict[int, TableRow]
    curve: TableRow
    private: TableRow

    def lookup(self, tag: int) -> TableRow | None:
        """Return the row governing a (non-private) data element tag, if any."""
        row = self.by_tag.get(tag)
        if row is not None:
            return row
        group, element = tag >> 16, tag & 0xFFFF
        if 0x6000 <= group <= 0x601E and group % 2 == 0:
            return self.overlay_by_element.get(element)
        if 0x5000 <= group <= 0x501E and group % 2 == 0:
            return self.curve
        return None


@cache
def confidentiality_table() -> ConfidentialityTable:
    """Load Table E.1-1 (cached; the file is read once per process)."""
    rows: list[TableRow] = []
    for record in _read_csv("e1-1.csv"):
        pattern, tag = _parse_tag(record["tag"])
        codes = [record["basic"], *(record[c] for c in OPTION_COLUMNS)]
        for code in filter(None, codes):
            if code not in ACTION_CODES:
                raise ValueError(f"Table E.1-1 {record['tag']}: unknown action code {code!r}")
        rows.append(
            TableRow(
                tag_text=record["tag"],
                name=record["name"],
                pattern=pattern,
                tag=tag,
                retired=record["retired"] == "Y",
                in_standard_iod=record["in_std_comp_iod"] == "Y",
                basic=record["basic"],
                options={c: record[c] for c in OPTION_COLUMNS if record[c]},
            )
        )
    by_tag = {r.tag: r for r in rows if r.pattern is TagPattern.EXACT}
    overlay = {r.tag: r for r in rows if r.pattern is TagPattern.OVERLAY}
    (curve,) = (r for r in rows if r.pattern is TagPattern.CURVE)
    (private,) = (r for r in rows if r.pattern is TagPattern.PRIVATE)
    return ConfidentialityTable(tuple(rows), by_tag, overlay, curve, private)


@dataclass(frozen=True, slots=True)
class SafePrivateAttribute:
    """One row of Table E.3.10-1."""

    private_creator: str
    group: int
    element: int  # the low byte (``ee`` of ``xxee``)
    vr: str
    meaning: str


@cache
def safe_private_attributes() -> dict[tuple[str, int, int], SafePrivateAttribute]:
    """Table E.3.10-1 keyed by (private creator, group, element low byte).

    Private creators are compared exactly as the standard prints them,
    with surrounding spaces removed (the padding a VR of LO may add).
    """
    table: dict[tuple[str, int, int], SafePrivateAttribute] = {}
    for record in _read_csv("safe-private.csv"):
        element_text = record["element"].lower()
        if not element_text.startswith("xx") or len(element_text) != 4:
            raise ValueError(f"Table E.3.10-1: unrecognised element {record['element']!r}")
        entry = SafePrivateAttribute(
            private_creator=record["private_creator"].strip(),
            group=int(record["group"], 16),
            element=int(element_text[2:], 16),
            vr=record["vr"],
            meaning=record["meaning"],
        )
        table[(entry.private_creator, entry.group, entry.element)] = entry
    return table

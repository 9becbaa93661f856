"""A second reader: search a de-identified dataset for the identifying values
its input carried.

Rules can be wrong, a vendor can hide a name where no rule looks, a new
private block can appear after a scanner update. After the engine has done
its work, every element at every depth (kept private elements, file meta,
structured content, specimen items, and text inside OB and UN values) is
searched, case-insensitively, for the values harvested from the input before
any change and for every original UID that was replaced. A hit names the
attribute path, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pydicom.dataset import Dataset

from gateway.deid.clean import coded_vocabulary
from gateway.deid.harvest import IdentifyingValues
from gateway.deid.profile import Profile
from gateway.deid.uids import is_well_known

_SKIP_VRS = frozenset(
    {"DS", "IS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV", "AT", "OD", "OF", "OL", "OV", "OW"}
)
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


@dataclass(frozen=True, slots=True)
class Finding:
    """An identifying value found in the output: where, and of what kind."""

    path: str
    kind: str  # "value" (name, identifier...), "date" or "uid"


class OutputScanner:
    """Searches datasets for identifying values of an input (or of a batch)."""

    def __init__(
        self,
        found: IdentifyingValues,
        replaced_uids: Iterable[str],
        *,
        institutions: bool = True,
        devices: bool = True,
        dates: bool = True,
        dates_in_date_elements: bool = True,
    ) -> None:
        """``dates_in_date_elements=False`` searches DA, DT and TM elements for
        UIDs only: over a batch of many patients, a shifted date of one patient
        is bound to equal an original date of another."""
        plain = found.text_values(institutions=institutions, devices=devices, dates=False)
        names = found.text_values(institutions=False, devices=False, dates=False) - found.identifiers
        # A value made only of descriptive words (a label reading "H&E") is kept
        # in descriptions on purpose; names are always searched for.
        plain = {v for v in plain if v in names or not _descriptive(v)}
        dated = found.text_values(dates=True) - found.text_values(dates=False) if dates else set()
        self._values = _alternation(plain, r"[0-9A-Za-z]")
        self._dates = _alternation(dated, r"[0-9A-Za-z]")
        self._uids = _alternation({u for u in replaced_uids if u}, r"[0-9.]")
        self._dates_in_date_elements = dates_in_date_elements

    def scan(self, dataset: Dataset) -> list[Finding]:
        """Every place in ``dataset`` (and its file meta) where a value turns up."""
        findings: list[Finding] = []
        meta = getattr(dataset, "file_meta", None)
        if meta is not None:
            findings += self._scan(meta, "file_meta.")
        findings += self._scan(dataset, "")
        return findings

    def _scan(self, dataset: Dataset, where: str) -> list[Finding]:
        found: list[Finding] = []
        for path, vr, text in _texts(dataset, where):
            if self._uids is not None and self._uids.search(text):
                found.append(Finding(path, "uid"))
            elif self._values is not None and self._values.search(text):
                found.append(Finding(path, "value"))
            elif (
                self._dates is not None
                and (self._dates_in_date_elements or vr not in _DATE_VRS)
                and self._dates.search(text)
            ):
                found.append(Finding(path, "date"))
        return found


def scanner_for(profile: Profile, found: IdentifyingValues, *, batch: bool = False) -> OutputScanner:
    """The scanner for what ``profile`` removes: every identifying value and
    non-standard UID ``found`` holds, except what an option deliberately keeps.
    ``batch`` (the values of many patients at once) leaves date elements to
    UID checks only, see :class:`OutputScanner`."""
    options = profile.options
    uids = () if "retain_uids" in options else (u for u in found.uids if not is_well_known(u))
    return OutputScanner(
        found,
        uids,
        institutions="retain_institution_identity" not in options,
        devices="retain_device_identity" not in options,
        dates=profile.dates_mode != "full",
        dates_in_date_elements=not batch,
    )


def _descriptive(value: str) -> bool:
    if any(c.isdigit() for c in value):
        return False
    vocabulary = coded_vocabulary()
    return all(len(w) <= 2 or w.lower() in vocabulary for w in re.findall(r"[^\W\d_]+", value))


def _alternation(values: set[str], word: str) -> re.Pattern[str] | None:
    """One pattern for all values, not matching inside longer words or numbers;
    name components may be joined by spaces, commas or ``^``."""
    if not values:
        return None
    parts = []
    for value in sorted(values, key=len, reverse=True):
        tokens = [t for t in re.split(r"[\s^]+", value) if t]
        if tokens:
            parts.append(r"[\s^,]+".join(re.escape(t) for t in tokens))
    return re.compile(f"(?<!{word})(?:{'|'.join(parts)})(?!{word})", re.IGNORECASE)


def _texts(dataset: Dataset, where: str) -> Iterator[tuple[str, str, str]]:
    """(path, VR, text) for every searchable value, at every depth."""
    for elem in dataset:
        if int(elem.tag) in _PIXEL_TAGS:
            continue
        label = where + (elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})")
        vr = elem.VR
        if vr == "SQ":
            for index, item in enumerate(elem.value or ()):
                yield from _texts(item, f"{label}[{index}].")
            continue
        value = elem.value
        if value is None or vr in _SKIP_VRS:
            continue
        if isinstance(value, bytes | bytearray):
            raw = bytes(value)
            yield label, vr, raw.decode("utf-8", "ignore") + "\n" + raw.decode("latin-1")
        elif isinstance(value, str) or (vr == "PN" and not isinstance(value, list | tuple)):
            yield label, vr, str(value)
        else:
            try:
                yield label, vr, "\\".join(str(v) for v in value)
            except TypeError:
                yield label, vr, str(value)

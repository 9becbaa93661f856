"""Harvest the identifying values an instance carries, before it is changed.

The cleaner uses them to remove identifiers that turn up inside free text,
and a verifier can search the output for any of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: Text attributes whose values identify a patient, a case or a slide.
IDENTIFIER_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "AccessionNumber",
        "StudyID", "ContainerIdentifier", "SpecimenIdentifier", "BarcodeValue",
        "LabelText", "MedicalRecordLocator", "AdmissionID", "ServiceEpisodeID",
        "PatientAddress", "PatientTelephoneNumbers", "RequestedProcedureID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest", "PerformedProcedureStepID",
        "ScheduledProcedureStepID", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
        "LocalNamespaceEntityID", "UniversalEntityID", "OtherPatientNames",
        "PatientMotherBirthName", "PatientBirthName",
    }
)  # fmt: skip

#: Values the Retain Institution Identity option keeps.
INSTITUTION_KEYWORDS: frozenset[str] = frozenset(
    {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"}
)
#: Values the Retain Device Identity option keeps.
DEVICE_KEYWORDS: frozenset[str] = frozenset({"StationName", "DeviceSerialNumber", "DeviceID"})

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MIN_COMPONENT = 3


def date_forms(value: date) -> set[str]:
    """The written forms a date commonly takes in free text."""
    d, m, y = value.day, value.month, value.year
    mon = _MONTHS[m - 1]
    full = value.strftime("%B")
    return {
        f"{y:04d}{m:02d}{d:02d}",
        f"{y:04d}-{m:02d}-{d:02d}",
        f"{y:04d}/{m:02d}/{d:02d}",
        f"{y:04d}.{m:02d}.{d:02d}",
        f"{d:02d}.{m:02d}.{y:04d}",
        f"{d}.{m}.{y:04d}",
        f"{d:02d}/{m:02d}/{y:04d}",
        f"{m:02d}/{d:02d}/{y:04d}",
        f"{d:02d}-{m:02d}-{y:04d}",
        f"{d}/{m}/{y:04d}",
        f"{m}/{d}/{y:04d}",
        f"{d:02d} {mon} {y:04d}",
        f"{d} {mon} {y:04d}",
        f"{d:02d}-{mon}-{y:04d}",
        f"{d} {full} {y:04d}",
        f"{full} {d}, {y:04d}",
        f"{mon} {d}, {y:04d}",
        f"{d:02d}.{m:02d}.{y % 100:02d}",
    }


def _parse_date(text: str) -> date | None:
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _values(value: object) -> Iterable[str]:
    items = value if isinstance(value, MultiValue | list | tuple) else [value]
    for item in items:
        if item is not None:
            text = str(item).strip("\0 ")
            if text:
                yield text


@dataclass
class IdentifyingValues:
    """What one instance says about who and what it is."""

    names: set[str] = field(default_factory=set)
    identifiers: set[str] = field(default_factory=set)
    institutions: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    dates: set[date] = field(default_factory=set)
    datetimes: set[str] = field(default_factory=set)
    uids: set[str] = field(default_factory=set)

    def update(self, other: IdentifyingValues) -> None:
        """Add another instance's values (to check a batch at once)."""
        self.names |= other.names
        self.identifiers |= other.identifiers
        self.institutions |= other.institutions
        self.devices |= other.devices
        self.dates |= other.dates
        self.datetimes |= other.datetimes
        self.uids |= other.uids

    def text_values(self, *, institutions: bool = True, devices: bool = True, dates: bool = True) -> set[str]:
        """Every value to look for in text: names, their components, identifiers,
        and (unless left out) institution and device names and dates in their
        written forms."""
        out = set(self.identifiers)
        if institutions:
            out |= self.institutions
        if devices:
            out |= self.devices
        for name in self.names:
            out.add(name)
            for part in re.split(r"[\^= ,]+", name):
                if len(part) >= _MIN_COMPONENT:
                    out.add(part)
        if dates:
            out |= self.datetimes
            for day in self.dates:
                out |= date_forms(day)
        return {v for v in out if len(v) >= _MIN_COMPONENT}


def harvest(dataset: Dataset) -> IdentifyingValues:
    """Collect identifying values from ``dataset`` and every nested item."""
    found = IdentifyingValues()
    _walk(dataset, found)
    return found


#: Concept names (scheme, value) of content items whose TEXT value is a
#: specimen identifier, as used in specimen preparation steps (TID 8001):
#: Specimen Identifier and Parent Specimen Identifier.
SPECIMEN_ID_CONCEPTS: frozenset[tuple[str, str]] = frozenset({("DCM", "121041"), ("DCM", "111705")})
#: ... whose TEXT value is a container (slide) identifier.
CONTAINER_ID_CONCEPTS: frozenset[tuple[str, str]] = frozenset({("DCM", "111700")})
#: Every concept whose TEXT value identifies a specimen, a container or their
#: issuer: harvested as identifiers.
IDENTIFIER_CONCEPTS: frozenset[tuple[str, str]] = (
    SPECIMEN_ID_CONCEPTS | CONTAINER_ID_CONCEPTS | {("DCM", "111724"), ("DCM", "111706")}
)


def concept_of(item: Dataset) -> tuple[str, str] | None:
    """The (scheme, value) of a content item's concept name, if it has one."""
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return None
    code = names[0]
    return (str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")))


def _walk(dataset: Dataset, found: IdentifyingValues) -> None:
    if "TextValue" in dataset and concept_of(dataset) in IDENTIFIER_CONCEPTS:
        found.identifiers.update(_values(dataset.TextValue))
    for elem in dataset:
        vr = elem.VR
        if vr == "SQ":
            for item in elem.value or ():
                _walk(item, found)
            continue
        if elem.value is None or vr in {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}:
            continue
        if vr == "PN":
            found.names.update(_values(elem.value))
        elif vr == "DA" or vr == "DT":
            for text in _values(elem.value):
                if (day := _parse_date(text)) is not None:
                    found.dates.add(day)
                    if vr == "DT" and len(text) > 8:
                        found.datetimes.add(text)
        elif vr == "UI":
            found.uids.update(_values(elem.value))
        elif elem.keyword in IDENTIFIER_KEYWORDS:
            found.identifiers.update(_values(elem.value))
        elif elem.keyword in INSTITUTION_KEYWORDS:
            found.institutions.update(_values(elem.value))
        elif elem.keyword in DEVICE_KEYWORDS:
            found.devices.update(_values(elem.value))

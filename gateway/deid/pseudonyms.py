"""Keyed pseudonyms for patients, slides (containers) and specimens.

A pseudonym is a function of the key and the original identifier only, so it
is stable across studies, instances and replicas. An optional lookup table
(original patient ID to research subject ID) takes precedence for patients.
"""

from __future__ import annotations

import base64
import csv
from dataclasses import dataclass
from pathlib import Path

from gateway.deid.keys import SecretKey


class PatientLookupError(ValueError):
    """The patient lookup table cannot be read."""


def _code(digest: bytes, length: int) -> str:
    return base64.b32encode(digest).decode("ascii").rstrip("=")[:length]


@dataclass(frozen=True)
class PatientLookup:
    """Original patient ID (optionally with issuer) to research subject ID.

    The CSV file has a header row with the columns ``original_id`` and
    ``research_id``, and optionally ``issuer``.
    """

    entries: dict[tuple[str, str], str]

    @classmethod
    def from_csv(cls, path: Path) -> PatientLookup:
        """Read a lookup table; errors name the file and line, never a value."""
        entries: dict[tuple[str, str], str] = {}
        try:
            with path.open(encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle)
                missing = {"original_id", "research_id"} - set(reader.fieldnames or ())
                if missing:
                    raise PatientLookupError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
                for record in reader:
                    original = (record["original_id"] or "").strip()
                    research = (record["research_id"] or "").strip()
                    if not original or not research:
                        raise PatientLookupError(f"{path}:{reader.line_num}: empty identifier")
                    entries[(original, (record.get("issuer") or "").strip())] = research
        except OSError as exc:
            raise PatientLookupError(f"cannot read patient lookup {path}: {exc.strerror}") from None
        return cls(entries)

    def get(self, patient_id: str, issuer: str) -> str | None:
        """The research ID for a patient; an entry without issuer matches any issuer."""
        return self.entries.get((patient_id, issuer)) or self.entries.get((patient_id, ""))


class Pseudonymizer:
    """Keyed pseudonyms with readable prefixes."""

    def __init__(self, key: SecretKey, lookup: PatientLookup | None = None) -> None:
        self._key = key
        self._lookup = lookup

    def patient(self, patient_id: str, issuer: str) -> str | None:
        """The subject pseudonym; ``None`` only when a lookup table misses the patient."""
        if self._lookup is not None:
            return self._lookup.get(patient_id, issuer)
        return "SUBJ-" + _code(self._key.digest("patient", issuer, patient_id), 12)

    def identifier(self, value: str) -> str:
        """The code shared by slide and specimen pseudonyms of one identifier.

        Containers and specimens use one namespace, so a specimen whose
        identifier equals its container's keeps that equality.
        """
        return _code(self._key.digest("specimen", value.strip()), 12)

    def slide(self, container_id: str) -> str:
        """Pseudonym for a Container Identifier (the slide barcode)."""
        return "SLIDE-" + self.identifier(container_id)

    def specimen(self, specimen_id: str) -> str:
        """Pseudonym for a Specimen Identifier."""
        return "SPECIMEN-" + self.identifier(specimen_id)

    def hashed(self, value: str, length: int) -> str:
        """A keyed hash of any value, for the profile action ``hash``."""
        return "H" + _code(self._key.digest("value", value), max(1, length - 1))

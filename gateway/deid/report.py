"""What the engine did to one instance."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.deid.verify import OutputScanner


class Outcome(enum.Enum):
    """The verdict on one instance."""

    PASSED = "passed"  # de-identified; may be forwarded
    DROPPED = "dropped"  # policy says never forward (e.g. a LABEL image); not an error
    QUARANTINED = "quarantined"  # held back for a person to look at


class RedactionReason(enum.StrEnum):
    """Why an overview was not redacted. The values are PHI-free codes."""

    NOT_AN_OVERVIEW = "not-an-overview"
    UNSUPPORTED_IMAGE = "unsupported-image"
    PIXEL_DATA_UNREADABLE = "pixel-data-unreadable"
    LABEL_AREA_NOT_FOUND = "label-area-not-found"
    REPLACEMENT_DOES_NOT_FIT = "replacement-does-not-fit"
    ENCODER_UNAVAILABLE = "encoder-unavailable"
    OCR_UNAVAILABLE = "ocr-unavailable"
    OCR_FAILED = "ocr-failed"
    TEXT_REMAINS = "text-remains"


@dataclass(frozen=True, slots=True)
class PixelReference:
    """Where a de-identified instance's pixel data is when it was not copied.

    The instance is the output file's first ``at`` bytes, then the bytes
    ``start`` to ``end`` of ``source`` (the input, unchanged), then the rest
    of the output file.
    """

    source: Path
    start: int
    end: int
    at: int


@dataclass(frozen=True, slots=True)
class ExplainEntry:
    """One element's fate: where it is, what was done and which rule chose it.

    Carries no value of the element.
    """

    path: str
    tag: str
    keyword: str
    vr: str
    action: str
    rule: str


@dataclass
class DeidReport:
    """The result of de-identifying one instance.

    ``uid_map`` and ``patient_map`` carry original identifiers: never log them.
    :meth:`public` gives the part that is safe for logs, metrics and audit.
    """

    outcome: Outcome = Outcome.PASSED
    reason: str | None = None
    detail: str = ""
    sop_class_uid: str = ""
    image_type: str | None = None
    transfer_syntax_uid: str = ""
    new_sop_instance_uid: str | None = None
    new_study_instance_uid: str | None = None
    new_series_instance_uid: str | None = None
    action_counts: Counter[str] = field(default_factory=Counter)
    uid_map: dict[str, str] = field(default_factory=dict)
    patient_map: dict[str, str] = field(default_factory=dict)
    unaddressed: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    explain: list[ExplainEntry] = field(default_factory=list)
    #: The scanner that searched the output for the input's identifying values
    #: (it holds them: never log it); kept to check instances that share this
    #: one's header, see :mod:`gateway.deid.reuse`.
    output_scanner: OutputScanner | None = field(default=None, repr=False, compare=False)
    #: Set when the caller asked for the pixel data by reference and the
    #: output file holds everything else (see :class:`PixelReference`).
    pixel_reference: PixelReference | None = field(default=None, repr=False, compare=False)

    def stop(self, outcome: Outcome, reason: str, detail: str) -> DeidReport:
        """Mark the instance as not passed, with a PHI-free reason code and sentence."""
        self.outcome = outcome
        self.reason = reason
        self.detail = detail
        return self

    def public(self) -> dict[str, Any]:
        """The PHI-free summary: codes, counts, standard UIDs and the new SOP Instance UID."""
        return {
            "outcome": self.outcome.value,
            "reason": self.reason,
            "detail": self.detail,
            "sop_class_uid": self.sop_class_uid,
            "image_type": self.image_type,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "new_sop_instance_uid": self.new_sop_instance_uid,
            "new_study_instance_uid": self.new_study_instance_uid,
            "new_series_instance_uid": self.new_series_instance_uid,
            "action_counts": dict(sorted(self.action_counts.items())),
            "unaddressed": list(self.unaddressed),
            "findings": list(self.findings),
        }

"""The de-identification engine: dataset in, dataset out plus a report.

It knows nothing of files or the network. For every element, at every depth,
it decides an action (from a profile rule, Table E.1-1 with the profile's
options, or the defaults for attributes the table does not list), resolves
compound codes from the attribute's Type in the instance's IOD, and applies
it. Keyed replacements (UIDs, pseudonyms, date offsets) depend only on the
key and the original value, so they agree across instances and replicas.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_has_tag, repeater_has_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag

from gateway import __version__
from gateway.deid import stream
from gateway.deid.clean import TextCleaner, coded_vocabulary
from gateway.deid.dates import DateShifter
from gateway.deid.dummies import MAX_LENGTH, dummy_value, empty_value
from gateway.deid.harvest import (
    CONTAINER_ID_CONCEPTS,
    SPECIMEN_ID_CONCEPTS,
    concept_of,
    harvest,
)
from gateway.deid.iod import attribute_type, required_level
from gateway.deid.keys import SecretKey
from gateway.deid.overview import overview_redactor
from gateway.deid.policy import has_pixel_data, image_flavor, judge
from gateway.deid.profile import EXTRA_ACTIONS, Profile
from gateway.deid.pseudonyms import PatientLookup, Pseudonymizer
from gateway.deid.report import DeidReport, ExplainEntry, Outcome
from gateway.deid.reuse import HeaderMemo
from gateway.deid.standard import (
    OPTION_COLUMNS,
    TableRow,
    confidentiality_table,
    safe_private_attributes,
)
from gateway.deid.uids import UIDRemapper
from gateway.deid.verify import scanner_for

_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC"})
_DATE_VRS = frozenset({"DA", "DT"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

#: Attributes of the Code Sequence Macro: coded concepts identify no one and
#: are the research value of structured content, so they are kept as they are.
_CODE_KEYWORDS = frozenset(
    {
        "CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning",
        "LongCodeValue", "URNCodeValue", "ContextIdentifier", "ContextUID",
        "MappingResource", "MappingResourceUID", "MappingResourceName",
        "ContextGroupVersion", "ContextGroupLocalVersion", "ContextGroupExtensionFlag",
        "ContextGroupExtensionCreatorUID", "EquivalentCodeSequence",
    }
)  # fmt: skip

#: More protective actions first: when several enabled options act on one
#: attribute, the most protective of them wins.
_PROTECTION = ("X", "X/Z", "X/D", "X/Z/D", "X/Z/U*", "Z", "Z/D", "D", "U", "C", "K")

#: CID 7050 (De-identification Method) code per option column.
_OPTION_CODES = {
    "retain_safe_private": codes.DCM.RetainSafePrivateOption,
    "retain_uids": codes.DCM.RetainUidsOption,
    "retain_device_identity": codes.DCM.RetainDeviceIdentityOption,
    "retain_institution_identity": codes.DCM.RetainInstitutionIdentityOption,
    "retain_patient_characteristics": codes.DCM.RetainPatientCharacteristicsOption,
    "retain_long_full_dates": codes.DCM.RetainLongitudinalTemporalInformationFullDatesOption,
    "retain_long_modified_dates": (codes.DCM.RetainLongitudinalTemporalInformationModifiedDatesOption),
    "clean_descriptors": codes.DCM.CleanDescriptorsOption,
    "clean_structured_content": codes.DCM.CleanStructuredContentOption,
    "clean_graphics": codes.DCM.CleanGraphicsOption,
}

#: Redacts an OVERVIEW image's pixels in place: (dataset, mode, research ids)
#: to a PHI-free failure reason, or None on success.
Redactor = Callable[[Dataset, str, tuple[str, str]], str | None]


@dataclass(frozen=True, slots=True)
class _Decision:
    action: str
    rule: str
    value: str | None = None


class _Instance:
    """Per-instance state of one de-identification run."""

    def __init__(self, engine: Deidentifier, dataset: Dataset, report: DeidReport, explain: bool) -> None:
        self.engine = engine
        self.report = report
        self.explain = explain
        self.sop_class = str(dataset.get("SOPClassUID", ""))
        self.found = harvest(dataset)
        found = self.found
        self.cleaner = TextCleaner(found, engine.profile.clean_patterns, engine.profile.clean_vocabulary)
        self.patient_key = _patient_key(dataset)
        self.day_offset = engine.dates.offset_days(self.patient_key)
        self.subject: str | None = None
        self.unaddressed: set[str] = set()
        self.quarantine_unaddressed = False


def _patient_key(dataset: Dataset) -> str:
    """What identifies the patient for pseudonyms and date offsets.

    The Patient ID with its issuer; without an ID, the name and birth date;
    without those, the study, so that at least one study stays consistent.
    """
    patient_id = str(dataset.get("PatientID", "") or "").strip()
    if patient_id:
        return f"id\0{dataset.get('IssuerOfPatientID', '') or ''}\0{patient_id}"
    name = str(dataset.get("PatientName", "") or "").strip()
    if name:
        return f"name\0{name}\0{dataset.get('PatientBirthDate', '') or ''}"
    return f"study\0{dataset.get('StudyInstanceUID', '') or ''}"


class Deidentifier:
    """Apply one profile with one key. Build once, reuse for every instance.

    Instances are independent; one ``Deidentifier`` may serve several threads.
    """

    def __init__(
        self,
        profile: Profile,
        key: SecretKey,
        *,
        patient_lookup: PatientLookup | None = None,
        redactor: Redactor | None = None,
        reuse_headers: bool = True,
    ) -> None:
        if patient_lookup is None and profile.patient_lookup is not None:
            patient_lookup = PatientLookup.from_csv(profile.patient_lookup)
        if profile.patient_lookup_required and patient_lookup is None:
            raise ValueError(f"profile {profile.name} requires a patient lookup table")
        self.profile = profile
        self.key = key
        self.uids = UIDRemapper(key, profile.uid_root)
        self.pseudonyms = Pseudonymizer(key, patient_lookup)
        self.dates = DateShifter(key, *profile.date_shift_days)
        self.redactor = redactor or overview_redactor(profile.pixels.ocr)
        self._table = confidentiality_table()
        self._row_actions = {id(row): self._row_action(row) for row in self._table.rows}
        coded_vocabulary()  # built once per process (about half a second), now and not at the first instance
        #: De-identified headers kept for the next instances of a series
        #: (``reuse_headers=False``: every instance takes a full run).
        self.memo = HeaderMemo() if reuse_headers else None

    # ----------------------------------------------------------------- rules
    def _row_action(self, row: TableRow) -> _Decision:
        enabled = self.profile.options
        chosen = [(row.options[o], o) for o in OPTION_COLUMNS if o in enabled and o in row.options]
        if chosen:
            code, option = min(chosen, key=lambda c: _PROTECTION.index(c[0]))
            return _Decision(code, f"Table E.1-1 {row.tag_text} {row.name}: option {option}")
        return _Decision(row.basic, f"Table E.1-1 {row.tag_text} {row.name}: Basic Profile")

    def _decide_public(self, elem: DataElement, content: str | None) -> _Decision:
        tag = int(elem.tag)
        if (tag >> 16) in (0x0000, 0x0002):
            return _Decision("X", "command or file meta element inside the dataset: removed")
        rule = self.profile.rules.get(tag)
        if rule is not None:
            return _Decision(rule.action, f"profile {rule.source}: {rule.why}", rule.value)
        row = self._table.lookup(tag)
        if row is not None:
            decision = self._row_actions[id(row)]
            return self._dates_override(elem, decision)
        vr = elem.VR
        if (tag & 0xFFFF) == 0:
            return _Decision("X", "group length: recomputed by the writer, so removed")
        if vr == "UI":
            if "retain_uids" in self.profile.options:
                return _Decision("K", "not in Table E.1-1: UID kept (Retain UIDs)")
            return _Decision("U", "not in Table E.1-1: every UID is remapped")
        if content is not None and vr in _TEXT_VRS and elem.keyword not in _CODE_KEYWORDS:
            action = "C" if content == "clean" else "D"
            return _Decision(action, "free text in structured content")
        if vr in _DATE_VRS:
            return self._dates_override(elem, _Decision("X/Z/D", "not in Table E.1-1: a date"))
        if vr == "PN":
            return _Decision("X/Z/D", "not in Table E.1-1: a person's name")
        if not (dictionary_has_tag(tag) or repeater_has_tag(tag)):
            return _Decision(
                "?unknown",
                f"not a standard attribute: unknown_attributes {self.profile.unknown_attributes}",
            )
        return _Decision(
            "?standard",
            "standard attribute not in Table E.1-1: "
            f"unknown_standard_attributes {self.profile.unknown_standard_attributes}",
        )

    def _dates_override(self, elem: DataElement, decision: _Decision) -> _Decision:
        """With a Retain Longitudinal Temporal Information option, every DA and
        DT value is kept (Full Dates) or shifted (Modified Dates)."""
        if elem.VR not in _DATE_VRS:
            return decision
        mode = self.profile.dates_mode
        if mode == "modified" and decision.action in ("K", "C"):
            return _Decision("C", decision.rule + "; dates shifted (Modified Dates)")
        if mode == "full" and decision.action == "C":
            return _Decision("K", decision.rule + "; dates kept (Full Dates)")
        return decision

    def _decide_private(self, dataset: Dataset, elem: DataElement) -> _Decision:
        group, element = elem.tag.group, elem.tag.element
        if group < 0x0008 or element < 0x1000:
            return _Decision("X", "private: invalid private tag")
        creator_tag = Tag(group, element >> 8)
        creator = str(dataset[creator_tag].value).strip() if creator_tag in dataset else ""
        if not creator:
            return _Decision("X", "private: no private creator")
        key = (creator, group, element & 0xFF)
        rule = self.profile.rules.get(key)
        if rule is not None:
            return _Decision(rule.action, f"profile {rule.source}: {rule.why}", rule.value)
        if creator in self.profile.keep_private_creators:
            return _Decision("K", "private: creator kept by the profile")
        if "retain_safe_private" in self.profile.options and key in safe_private_attributes():
            return _Decision("K", "private: Table E.3.10-1 safe attribute (Retain Safe Private)")
        return _Decision(
            "?unknown",
            "Table E.1-1 private attributes, no rule keeps it: "
            f"unknown_attributes {self.profile.unknown_attributes}",
        )

    # ------------------------------------------------------------------ walk
    def _walk(
        self,
        dataset: Dataset,
        path: tuple[str, ...],
        where: str,
        state: _Instance,
        content: str | None,
    ) -> None:
        if content is None and "ValueType" in dataset:
            # A content item outside any sequence Table E.1-1 names (e.g. Specimen
            # Localization Content Item Sequence): its values are structured content.
            content = "clean" if "clean_structured_content" in self.profile.options else "dummy"
        concept = concept_of(dataset) if content is not None and "TextValue" in dataset else None
        pseudonymise: Callable[[str], str] | None = None
        if concept in SPECIMEN_ID_CONCEPTS:
            pseudonymise, action = self.pseudonyms.specimen, "specimen_pseudonym"
        elif concept in CONTAINER_ID_CONCEPTS:
            pseudonymise, action = self.pseudonyms.slide, "slide_pseudonym"
        if pseudonymise is not None:
            elem = dataset["TextValue"]
            elem.value = pseudonymise(str(elem.value))
            self._note(
                state, where + "TextValue", elem, action,
                "identifier item of structured content: pseudonymised",
            )  # fmt: skip
        for tag in list(dataset.keys()):
            tag = BaseTag(tag)
            try:
                elem = dataset[tag]
            except Exception:  # any element pydicom cannot decode is removed: fail closed
                del dataset[tag]
                state.report.action_counts["X"] += 1
                continue
            if tag.is_private:
                if tag.is_private_creator:
                    continue
                decision = self._decide_private(dataset, elem)
            elif pseudonymise is not None and elem.keyword == "TextValue":
                continue
            else:
                decision = self._decide_public(elem, content)
            self._apply(dataset, elem, decision, path, where, state, content)
        _drop_orphan_creators(dataset)

    def _apply(
        self,
        dataset: Dataset,
        elem: DataElement,
        decision: _Decision,
        path: tuple[str, ...],
        where: str,
        state: _Instance,
        content: str | None,
    ) -> None:
        label = where + (elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})")
        action = decision.action
        if action.startswith("?"):
            policy = (
                self.profile.unknown_attributes
                if action == "?unknown"
                else self.profile.unknown_standard_attributes
            )
            state.unaddressed.add(_INDEX.sub("[*]", label))
            if policy == "quarantine":
                state.quarantine_unaddressed = True
            action = _UNKNOWN_ACTIONS[policy]
        action = self._resolve(action, elem, path, state)
        self._note(state, label, elem, action, decision.rule)
        vr = elem.VR
        if action == "X":
            del dataset[elem.tag]
        elif action == "Z":
            elem.value = empty_value(vr)
        elif vr == "SQ":
            mode = {"C": "clean", "D": "dummy"}.get(action, content)
            keyword = elem.keyword or "Private"
            for index, item in enumerate(elem.value or ()):
                self._walk(item, (*path, keyword), f"{label}[{index}].", state, mode)
        elif action in _EXTRA:
            self._extra(elem, action, decision.value, path, state)
        elif action == "K":
            # A kept private UID is still a UID: remapped unless Retain UIDs.
            if vr == "UI" and elem.tag.is_private and "retain_uids" not in self.profile.options:
                elem.value = self._map_values(elem.value, lambda v: self._remap_uid(v, state))
        elif action == "U" or vr == "UI":
            if vr == "UI":
                elem.value = self._map_values(elem.value, lambda v: self._remap_uid(v, state))
            else:
                elem.value = dummy_value(vr)
        elif action == "D":
            elem.value = dummy_value(vr)
        else:
            self._clean(elem, path, state)

    def _resolve(self, code: str, elem: DataElement, path: tuple[str, ...], state: _Instance) -> str:
        """Resolve a compound code from the attribute's Type; unknown Type takes
        the more protective choice."""
        if "/" not in code:
            return code
        level = required_level(attribute_type(state.sop_class, path, elem.keyword))
        if code == "Z/D":
            return "D" if level == 1 else "Z"
        if code == "X/Z/U*":
            return {1: "U", 2: "Z"}.get(level or 3, "X")
        options = code.split("/")
        if level == 1 and "D" in options:
            return "D"
        if level in (1, 2) and "Z" in options:
            return "Z"
        if level == 1:
            return "D"
        return "X"

    def _clean(self, elem: DataElement, path: tuple[str, ...], state: _Instance) -> None:
        vr = elem.VR
        if vr in _TEXT_VRS or vr == "CS":
            limit = MAX_LENGTH.get(vr)
            values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
            cleaned = [state.cleaner.clean(str(v)) for v in values if v is not None]
            if any(c is None for c in cleaned):
                # Not sure the text is clean: empty it as its Type allows.
                action = self._resolve("Z/D", elem, path, state)
                elem.value = dummy_value(vr) if action == "D" else empty_value(vr)
                state.report.action_counts["C:emptied"] += 1
            elif cleaned:
                texts = [_fit(c, limit) for c in cleaned if c is not None]
                elem.value = texts if len(texts) > 1 else texts[0]
        elif vr in _DATE_VRS:
            shift = DateShifter.shift_da if vr == "DA" else DateShifter.shift_dt
            elem.value = self._map_values(elem.value, lambda v: shift(v, state.day_offset) or dummy_value(vr))
        elif vr == "TM":
            if self.profile.dates_mode == "remove":
                elem.value = dummy_value(vr)
        elif vr == "PN":
            elem.value = dummy_value(vr)
        elif vr in _BINARY_VRS:
            elem.value = empty_value(vr)
        # Numbers, ages and attribute tags carry no free text: kept.

    def _extra(
        self, elem: DataElement, action: str, value: str | None, path: tuple[str, ...], state: _Instance
    ) -> None:
        vr = elem.VR
        if action == "replace":
            elem.value = value
        elif action == "hash":
            length = MAX_LENGTH.get(vr, 64)
            elem.value = self._map_values(elem.value, lambda v: self.pseudonyms.hashed(v, length))
        elif action == "date_shift":
            if vr in _DATE_VRS:
                self._clean(elem, path, state)
        elif action == "pseudonym":
            elem.value = state.subject
        elif action in ("slide_pseudonym", "specimen_pseudonym"):
            make = self.pseudonyms.slide if action == "slide_pseudonym" else self.pseudonyms.specimen
            if elem.value:
                elem.value = self._map_values(elem.value, make)
            else:
                elem.value = dummy_value(vr)

    def _remap_uid(self, uid: str, state: _Instance) -> str:
        new = self.uids.remap(uid)
        if new != uid:
            state.report.uid_map[uid.strip("\0 ")] = new
        return new

    @staticmethod
    def _map_values(value: Any, fn: Callable[[str], str]) -> Any:
        if value is None or value == "":
            return value
        if isinstance(value, MultiValue | list | tuple):
            return [fn(str(v)) for v in value]
        return fn(str(value))

    def _note(self, state: _Instance, label: str, elem: DataElement, action: str, rule: str) -> None:
        state.report.action_counts[action] += 1
        if state.explain:
            state.report.explain.append(
                ExplainEntry(
                    path=label,
                    tag=f"({elem.tag.group:04X},{elem.tag.element:04X})",
                    keyword=elem.keyword or "",
                    vr=elem.VR,
                    action=action,
                    rule=rule,
                )
            )

    # ------------------------------------------------------------ public API
    def deidentify(
        self, dataset: Dataset, *, has_pixels: bool | None = None, explain: bool = False
    ) -> DeidReport:
        """De-identify ``dataset`` in place and say what happened.

        ``has_pixels`` tells whether the instance carries pixel data when the
        dataset was read without it (streaming). When the outcome is not
        ``PASSED``, the dataset must not be used.
        """
        report = DeidReport(
            sop_class_uid=str(dataset.get("SOPClassUID", "")),
            image_type=image_flavor(dataset),
        )
        file_meta = getattr(dataset, "file_meta", None)
        if file_meta is not None:
            report.transfer_syntax_uid = str(file_meta.get("TransferSyntaxUID", ""))
        if "SOPInstanceUID" not in dataset or "SOPClassUID" not in dataset:
            return report.stop(
                Outcome.QUARANTINED, "missing-sop-uids", "the instance has no SOP Class or SOP Instance UID"
            )
        pixels = has_pixel_data(dataset) if has_pixels is None else has_pixels
        verdict = judge(dataset, pixels, self.profile.pixels)
        if verdict.outcome is not Outcome.PASSED:
            report.stop(verdict.outcome, verdict.reason or "policy", verdict.detail)
            if not explain:
                return report
        state = _Instance(self, dataset, report, explain)
        patient_id = str(dataset.get("PatientID", "") or "").strip()
        issuer = str(dataset.get("IssuerOfPatientID", "") or "").strip()
        state.subject = self.pseudonyms.patient(patient_id, issuer)
        if state.subject is None and report.outcome is Outcome.PASSED:
            return report.stop(
                Outcome.QUARANTINED,
                "patient-not-in-lookup",
                "the patient is missing from the required lookup table",
            )
        if patient_id and state.subject is not None:
            report.patient_map[patient_id] = state.subject
        container = str(dataset.get("ContainerIdentifier", "") or "").strip()
        slide = self.pseudonyms.slide(container) if container else ""
        self._walk(dataset, (), "", state, None)
        if report.outcome is not Outcome.PASSED:
            return report
        report.unaddressed = sorted(state.unaddressed)
        if state.quarantine_unaddressed:
            return report.stop(
                Outcome.QUARANTINED,
                "unknown-attribute",
                "the instance holds attributes no rule addresses (see the report's unaddressed list)",
            )
        if verdict.redact is not None:
            failure = self.redactor(dataset, verdict.redact, (state.subject or "", slide))
            if failure is not None:
                return report.stop(
                    Outcome.QUARANTINED, failure, "the OVERVIEW label area could not be redacted safely"
                )
        self._mark(dataset)
        scanner = scanner_for(self.profile, state.found)
        findings = scanner.scan(dataset)
        if findings:
            report.findings = [f"{f.path} ({f.kind})" for f in findings]
            return report.stop(
                Outcome.QUARANTINED,
                "phi-found-in-output",
                f"an identifying value of the input was found in {len(findings)} element(s) of the output",
            )
        report.output_scanner = scanner
        report.new_sop_instance_uid = str(dataset.SOPInstanceUID)
        report.new_study_instance_uid = str(dataset.get("StudyInstanceUID", "")) or None
        report.new_series_instance_uid = str(dataset.get("SeriesInstanceUID", "")) or None
        return report

    def deidentify_file(
        self,
        src: Path,
        dst: Path,
        *,
        explain: bool = False,
        durable: bool = True,
        pixels_by_reference: bool = False,
    ) -> DeidReport:
        """De-identify the file ``src`` into ``dst``, streaming the pixel data
        (see :mod:`gateway.deid.stream`); ``dst`` exists only when passed, and
        is flushed to disk unless ``durable`` is false. With
        ``pixels_by_reference`` the pixel data stays in ``src`` and the
        report's ``pixel_reference`` says where it goes."""
        return stream.deidentify_file(
            self, src, dst, explain=explain, durable=durable, pixels_by_reference=pixels_by_reference
        )

    def _mark(self, dataset: Dataset) -> None:
        """Record what was done, as PS3.15 E.1.1 asks."""
        profile = self.profile
        meta = getattr(dataset, "file_meta", None)
        if meta is not None:
            meta.MediaStorageSOPClassUID = dataset.SOPClassUID
            meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            for keyword in _FILE_META_IDENTITY:
                if keyword in meta:
                    del meta[keyword]
        dataset.PatientIdentityRemoved = "YES"
        dataset.DeidentificationMethod = (
            f"deid-gateway {__version__} profile {profile.name} sha256:{profile.content_hash[:16]}"
        )
        method_codes = [codes.DCM.BasicApplicationConfidentialityProfile]
        method_codes += [_OPTION_CODES[o] for o in OPTION_COLUMNS if o in profile.options]
        if profile.pixels.overview in ("redact", "replace"):
            method_codes.append(codes.DCM.CleanPixelDataOption)
        items = []
        for code in method_codes:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            items.append(item)
        dataset.DeidentificationMethodCodeSequence = Sequence(items)
        dataset.LongitudinalTemporalInformationModified = {
            "full": "UNMODIFIED", "modified": "MODIFIED", "remove": "REMOVED",
        }[profile.dates_mode]  # fmt: skip


#: File meta elements that name the systems an instance came through.
_FILE_META_IDENTITY = (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle", "SourcePresentationAddress",
    "SendingPresentationAddress", "ReceivingPresentationAddress",
    "PrivateInformationCreatorUID", "PrivateInformation",
)  # fmt: skip

_UNKNOWN_ACTIONS = {"remove": "X", "keep": "K", "quarantine": "X"}
_INDEX = re.compile(r"\[\d+\]")
_EXTRA = EXTRA_ACTIONS


def _fit(text: str, limit: int | None) -> str:
    return text if limit is None else text[:limit]


def _drop_orphan_creators(dataset: Dataset) -> None:
    """Remove private creator elements whose block lost all its elements."""
    blocks = {
        (tag.group, tag.element >> 8)
        for tag in (BaseTag(t) for t in dataset.keys())
        if tag.is_private and not tag.is_private_creator and tag.element >= 0x1000
    }
    for tag in [BaseTag(t) for t in dataset.keys()]:
        if tag.is_private_creator and (tag.group, tag.element) not in blocks:
            del dataset[tag]


__all__ = ["Deidentifier", "Redactor"]

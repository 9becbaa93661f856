"""Table-driven planting: a distinctive value in every attribute of Table E.1-1
that can be filled, top level and nested, and a search of the output bytes.

The list of attributes comes from profiles/ps315/e1-1.csv itself. A planted
value may survive only where the profile's resolved action is K (keep), which
the test reads from the engine's own explanation; everywhere else it must be
gone from every byte of the output file.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.deid.standard import TagPattern, confidentiality_table

KEY = SecretKey(b"table-driven-test-key-0123456789abcdef")
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
_counter = itertools.count(1)


def _token(vr: str) -> str | bytes | None:
    """A distinctive value valid for ``vr``, or None where none can be planted."""
    n = next(_counter)
    if vr in ("LO", "LT", "ST", "UT", "UC", "SH"):
        return f"TKN{n:05d}Q"
    if vr == "PN":
        return f"TKN{n:05d}Q^TKNG{n:05d}"
    if vr == "AE":
        return f"TKN{n:05d}Q"
    if vr == "CS":
        return f"TKN{n:05d}Q"
    if vr == "UI":
        return f"1.3.6.1.4.1.99999.{n}.77"
    if vr == "DA":
        return f"1911{(n % 12) + 1:02d}{(n % 27) + 1:02d}"
    if vr == "DT":
        return f"1911{(n % 12) + 1:02d}{(n % 27) + 1:02d}101010"
    if vr == "UR":
        return f"http://tkn{n:05d}q.example"
    if vr in ("OB", "UN"):
        return f"TKN{n:05d}Q".encode()
    return None


def _needle(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.split("^")[0].encode()


def planted_rows() -> list[tuple[int, str]]:
    """Every exact-tag row of Table E.1-1 that pydicom knows the VR of."""
    rows = []
    for row in confidentiality_table().rows:
        if row.pattern is not TagPattern.EXACT or (row.tag >> 16) in (0x0000, 0x0002):
            continue
        try:
            vr = dictionary_VR(row.tag)
        except KeyError:
            continue
        rows.append((row.tag, vr.split(" or ")[0]))
    return rows


def build(tmp_path: Path) -> tuple[Path, dict[str, str | bytes]]:
    """A WSI-like instance with a token in every fillable table attribute, at
    the top level, inside each table sequence, and inside a kept sequence."""
    ds = Dataset()
    planted: dict[str, str | bytes] = {}
    for tag, vr in planted_rows():
        keyword = keyword_for_tag(tag) or f"{tag:08X}"
        if vr == "SQ":
            item = Dataset()
            value = _token("LO")
            assert value is not None
            item.InstitutionName = value
            planted[f"{keyword}[0].InstitutionName"] = value
            ds.add_new(tag, "SQ", [item])
            continue
        value = _token(vr)
        if value is None:
            continue
        ds.add_new(tag, vr, value)
        planted[keyword] = value
    # Inside a standard sequence Table E.1-1 does not name (kept, walked).
    kept = Dataset()
    kept.PatientName = "TKNNESTED^PERSON"
    kept.ReferencedSOPInstanceUID = "1.3.6.1.4.1.99999.555.1"
    ds.SpecimenDescriptionSequence = [kept]
    planted["SpecimenDescriptionSequence[0].PatientName"] = "TKNNESTED^PERSON"
    planted["SpecimenDescriptionSequence[0].ReferencedSOPInstanceUID"] = "1.3.6.1.4.1.99999.555.1"
    ds.SOPClassUID = WSI
    ds.SOPInstanceUID = "1.3.6.1.4.1.99999.1.1"
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.BurnedInAnnotation = "NO"
    ds.BitsAllocated = 8
    ds.add_new(0x7FE00010, "OB", b"\0\0")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = WSI
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "planted.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, planted


@pytest.mark.parametrize("profile_name", ["basic", "research"])
def test_no_planted_value_survives_unless_kept(tmp_path: Path, profile_name: str) -> None:
    src, planted = build(tmp_path)
    assert len(planted) > 300  # the table has over 600 rows; most can be filled
    deid = Deidentifier(load_profile(profile_name), KEY)
    dst = tmp_path / "out.dcm"
    report = deid.deidentify_file(src, dst, explain=True)
    assert report.outcome is Outcome.PASSED, report.public()
    actions = {entry.path: entry.action for entry in report.explain}
    output = dst.read_bytes()
    leaked = []
    kept = []
    for path, value in planted.items():
        if _needle(value) in output:
            (kept if actions.get(path) == "K" else leaked).append(path)
    assert leaked == []
    # What the engine says it kept is exactly what is still there.
    assert sorted(kept) == sorted(p for p in planted if actions.get(p) == "K")
    if profile_name == "basic":
        assert kept == []  # the Basic Profile keeps nothing the table names
    else:
        # Retain Patient Characteristics keeps these (codes, not free text).
        assert {"PatientSex", "EthnicGroup", "SmokingStatus"} <= set(kept)


def test_uids_in_table_are_replaced_everywhere(tmp_path: Path) -> None:
    src, planted = build(tmp_path)
    dst = tmp_path / "out.dcm"
    report = Deidentifier(load_profile("basic"), KEY).deidentify_file(src, dst)
    assert report.outcome is Outcome.PASSED
    output = dst.read_bytes()
    uids = [v for v in planted.values() if isinstance(v, str) and v.startswith("1.3.6.1.4.1.99999")]
    assert uids
    assert [u for u in uids if u.encode() in output] == []
    assert b"1.3.6.1.4.1.99999.1.1" not in output  # the SOP Instance UID, in the file meta too
    out = pydicom.dcmread(dst)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


def test_marks_the_result(tmp_path: Path) -> None:
    src, _ = build(tmp_path)
    dst = tmp_path / "out.dcm"
    profile = load_profile("research")
    Deidentifier(profile, KEY).deidentify_file(src, dst)
    out = pydicom.dcmread(dst)
    assert out.PatientIdentityRemoved == "YES"
    assert profile.content_hash[:16] in out.DeidentificationMethod
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    # CID 7050: Basic Profile, Safe Private, Patient Characteristics, Modified
    # Dates, Clean Descriptors, Clean Structured Content, Clean Graphics.
    assert codes == {"113100", "113111", "113108", "113107", "113105", "113104", "113103"}
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"

"""Property-based tests of the engine: for arbitrary datasets built from the
standard's attributes, private blocks and nested sequences, the engine never
raises, and whatever it passes holds no planted value except where the
profile's resolved action is K (keep)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.deid.standard import TagPattern, confidentiality_table

KEY = SecretKey(b"property-test-key-0123456789abcdefgh")
ENGINES = {name: Deidentifier(load_profile(name), KEY) for name in ("basic", "research")}
SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.3.999",  # an unknown SOP class
]
TEXT_VRS = ("LO", "SH", "LT", "ST", "UT", "PN", "CS", "AE", "UC")


def _table_attributes() -> list[tuple[int, str]]:
    out = []
    for row in confidentiality_table().rows:
        if row.pattern is not TagPattern.EXACT or (row.tag >> 16) in (0x0000, 0x0002):
            continue
        try:
            vr = dictionary_VR(row.tag).split(" or ")[0]
        except KeyError:
            continue
        out.append((row.tag, vr))
    return out


TABLE = _table_attributes()
TEXT_ATTRS = [(t, vr) for t, vr in TABLE if vr in TEXT_VRS]
SEQ_ATTRS = [t for t, vr in TABLE if vr == "SQ"] + [0x00400560, 0x00400610, 0x0040A730, 0x00081115]
tokens = st.integers(min_value=0, max_value=10**6).map(lambda n: f"QZTOKEN{n:07d}")


@st.composite
def datasets(draw: st.DrawFn, depth: int = 0) -> Dataset:
    ds = Dataset()
    for tag, vr in draw(st.lists(st.sampled_from(TEXT_ATTRS), max_size=12, unique=True)):
        value = draw(tokens)
        ds.add_new(tag, vr, value[:16] if vr in ("CS", "AE", "SH") else value)
    if draw(st.booleans()):
        creator = draw(st.sampled_from(["ACME 1.0", "SIEMENS CSA HEADER", "GEMS_IDEN_01"]))
        ds.add_new(0x00090010, "LO", creator)
        ds.add_new(0x00091001, "LO", draw(tokens))
        ds.add_new(0x00091002, "UN", draw(tokens).encode())
    if draw(st.booleans()):
        ds.add_new(0x00081030, "LO", f"Biopsy {draw(tokens)} section")  # free text around a token
    if draw(st.booleans()):
        ds.add_new(0x00203401 - 0x00010000, "LO", draw(tokens))  # (0020,3401)-1: not in the dictionary
    if depth < 3:
        for tag in draw(st.lists(st.sampled_from(SEQ_ATTRS), max_size=3, unique=True)):
            items = draw(st.lists(datasets(depth + 1), max_size=2))
            ds.add_new(tag, "SQ", Sequence(items))
    if draw(st.booleans()):
        ds.add_new(0x0040A040, "CS", "TEXT")  # a content item
        ds.add_new(0x0040A160, "UT", f"Seen {draw(tokens)}")
    return ds


def _planted(ds: Dataset, where: str = "") -> dict[str, set[str]]:
    """Planted token -> the element paths holding it, in the engine's path format."""
    found: dict[str, set[str]] = {}
    for elem in ds:
        label = where + (elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})")
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value):
                for token, paths in _planted(item, f"{label}[{index}].").items():
                    found.setdefault(token, set()).update(paths)
            continue
        value = elem.value
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        for word in text.replace("^", " ").split():
            if word.startswith("QZTOKEN"):
                found.setdefault(word[:14], set()).add(label)
    return found


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    datasets(),
    st.sampled_from(SOP_CLASSES),
    st.sampled_from(sorted(ENGINES)),
    st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
)
def test_engine_never_raises_and_passes_no_planted_value(
    ds: Dataset, sop_class: str, profile: str, syntax: str
) -> None:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.3.6.1.4.1.99999.31.7"
    ds.PatientID = "QZTOKEN9999999"
    ds.BurnedInAnnotation = "NO"
    planted = _planted(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
        report = ENGINES[profile].deidentify_file(src, dst, explain=True)
        assert report.outcome in (Outcome.PASSED, Outcome.QUARANTINED)
        if report.outcome is not Outcome.PASSED:
            assert not dst.exists()
            return
        output = dst.read_bytes().decode("latin-1")
        kept = {e.path for e in report.explain if e.action == "K"}
        for token, paths in planted.items():
            if token in output:
                # Only an attribute the profile keeps may still hold it.
                assert paths & kept, (token, sorted(paths), report.public())
    assert "QZTOKEN9999999" not in output  # the Patient ID never survives


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_quarantined_not_raised(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        src.write_bytes(b"\0" * 128 + b"DICM" + data if data[:1] == b"\1" else data)
        report = ENGINES["research"].deidentify_file(src, dst)
        assert report.outcome in (Outcome.QUARANTINED, Outcome.PASSED)
        assert dst.exists() == (report.outcome is Outcome.PASSED)

"""Streaming file rewrite: pixel data copied byte for byte, transfer syntax kept,
malformed input quarantined as unreadable, large instances never loaded whole.

The pixel data element of input and output is located here independently of
the engine (from pydicom's raw element positions) and compared as raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.synthetic import PlantedPHI, SyntheticStudy, write_large_volume, write_slide

PIXEL_DATA = 0x7FE00010
SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data element lies in a file: [start, end) covers tag to last byte."""

    start: int
    end: int
    raw: bytes


def pixel_element(path: Path) -> PixelElement:
    """The whole Pixel Data element of ``path`` (tag, VR, length, value, delimiter) as raw bytes.

    Works from pydicom's recorded value position, not from the engine's code.
    """
    ds = pydicom.dcmread(path)
    raw = ds.get_item(PIXEL_DATA)
    assert raw is not None, f"{path.name} has no Pixel Data"
    implicit, little = ds.original_encoding
    assert little, "only little endian inputs are used here"
    header_length = 8 if implicit or raw.VR not in ("OB", "OW", "OD", "OF", "OL", "OV", "UN") else 12
    start = raw.value_tell - header_length
    end = raw.value_tell + len(raw.value)
    data = path.read_bytes()
    if raw.length == 0xFFFFFFFF:
        assert data[end : end + 8] == SEQUENCE_DELIMITER
        end += 8
    assert struct.unpack("<HH", data[start : start + 4]) == (0x7FE0, 0x0010)
    return PixelElement(start, end, data[start:end])


def transfer_syntax(path: Path) -> UID:
    return UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def deid(key: SecretKey) -> Deidentifier:
    return Deidentifier(load_profile("research"), key)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, synthetic_study: SyntheticStudy) -> dict[str, Path]:
    """One passing instance per encoding under test, all derived from the shared study."""
    folder = tmp_path_factory.mktemp("stream-inputs")
    phi = PlantedPHI.create(31)
    extended = write_slide(
        folder / "extended", phi, width=768, height=512, levels=1, label=False, overview=False,
        offset_table="extended",
    )[0]  # fmt: skip
    capture = next(p for p in synthetic_study.secondary_captures if p.name == "capture_no.dcm")
    ds = pydicom.dcmread(capture)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(folder / "implicit.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(capture)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(folder / "deflated.dcm", enforce_file_format=True)
    return {
        "jpeg-basic-offset-table": synthetic_study.slides[1][0],
        "jpeg-extended-offset-table": extended,
        "explicit-vr": capture,
        "implicit-vr": folder / "implicit.dcm",
        "deflated": folder / "deflated.dcm",
    }


# --------------------------------------------------------------------------
# Pixel data and transfer syntax


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("jpeg-basic-offset-table", JPEGBaseline8Bit),
        ("jpeg-extended-offset-table", JPEGBaseline8Bit),
        ("explicit-vr", ExplicitVRLittleEndian),
        ("implicit-vr", ImplicitVRLittleEndian),
    ],
)
def test_pixel_data_element_is_copied_byte_for_byte_in_the_input_transfer_syntax(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path, name: str, syntax: UID
) -> None:
    src = inputs[name]
    assert transfer_syntax(src) == syntax
    dst = tmp_path / "out.dcm"
    report = deid.deidentify_file(src, dst)
    assert report.outcome is Outcome.PASSED, report.public()
    assert transfer_syntax(dst) == syntax
    before, after = pixel_element(src), pixel_element(dst)
    assert after.raw == before.raw
    # Nothing follows the pixel data in these inputs, so nothing may follow it in the output.
    assert after.end == dst.stat().st_size
    out = pydicom.dcmread(dst)
    assert out.original_encoding == (syntax.is_implicit_VR, True)
    assert out.SOPInstanceUID == report.new_sop_instance_uid
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID


def test_basic_offset_table_and_frames_survive(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path
) -> None:
    src = inputs["jpeg-basic-offset-table"]
    dst = tmp_path / "out.dcm"
    assert deid.deidentify_file(src, dst).outcome is Outcome.PASSED
    original, copy = pydicom.dcmread(src), pydicom.dcmread(dst)
    frames = int(original.NumberOfFrames)
    assert int(copy.NumberOfFrames) == frames
    # The first item is a non-empty Basic Offset Table: one 32-bit offset per frame.
    (bot_length,) = struct.unpack("<I", original.PixelData[4:8])
    assert bot_length == 4 * frames
    assert list(generate_frames(copy.PixelData, number_of_frames=frames)) == list(
        generate_frames(original.PixelData, number_of_frames=frames)
    )


def test_extended_offset_table_is_kept_with_the_pixel_data(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path
) -> None:
    src = inputs["jpeg-extended-offset-table"]
    dst = tmp_path / "out.dcm"
    assert deid.deidentify_file(src, dst).outcome is Outcome.PASSED
    original, copy = pydicom.dcmread(src), pydicom.dcmread(dst)
    assert original.ExtendedOffsetTable, "the input must carry an Extended Offset Table"
    assert copy.ExtendedOffsetTable == original.ExtendedOffsetTable
    assert copy.ExtendedOffsetTableLengths == original.ExtendedOffsetTableLengths
    frames = int(original.NumberOfFrames)
    offsets = struct.unpack(f"<{frames}Q", copy.ExtendedOffsetTable)
    lengths = struct.unpack(f"<{frames}Q", copy.ExtendedOffsetTableLengths)
    # The offsets still point at the frames of the copied pixel data.
    pixel = copy.PixelData
    (bot_length,) = struct.unpack("<I", pixel[4:8])
    first_item = 8 + bot_length
    expected = list(generate_frames(original.PixelData, number_of_frames=frames))
    for index, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        item = first_item + offset
        assert pixel[item : item + 4] == b"\xfe\xff\x00\xe0"
        assert pixel[item + 8 : item + 8 + length] == expected[index]


def test_deflated_input_gives_deflated_output_with_the_same_pixels(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path
) -> None:
    src = inputs["deflated"]
    dst = tmp_path / "out.dcm"
    report = deid.deidentify_file(src, dst)
    assert report.outcome is Outcome.PASSED, report.public()
    assert transfer_syntax(dst) == DeflatedExplicitVRLittleEndian
    # The body after the file meta really is a raw deflate stream.
    data = dst.read_bytes()
    (meta_length,) = struct.unpack("<I", data[140:144])
    body = zlib.decompress(data[144 + meta_length :], -zlib.MAX_WBITS)
    assert len(body) > len(pydicom.dcmread(src).PixelData)
    assert pydicom.dcmread(dst).PixelData == pydicom.dcmread(src).PixelData


# --------------------------------------------------------------------------
# Elements after the pixel data

SIGNER_TOKEN = "PHISIGNERQWX"
TRAILING_TOKEN = "PHITRAILERQWX"


def _with_trailing_elements(src: Path, dst: Path, study_uid: str) -> Path:
    """``src`` plus a Digital Signatures Sequence, a private block and padding after Pixel Data."""
    ds = pydicom.dcmread(src)
    signature = Dataset()
    signature.MACIDNumber = 1
    signature.DigitalSignatureUID = study_uid
    signature.DigitalSignatureDateTime = "20200101120000"
    signature.CertificateType = "X509_1993_SIG"
    signature.CertificateOfSigner = f"CN={SIGNER_TOKEN} ".encode()
    signature.Signature = b"\x01\x02\x03\x04"
    ds.DigitalSignaturesSequence = [signature]
    block = ds.private_block(0x7FE1, "SYNTHETIC TRAILER", create=True)
    block.add_new(0x01, "LO", TRAILING_TOKEN)
    ds.DataSetTrailingPadding = (TRAILING_TOKEN + " ").encode()
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.mark.parametrize("name", ["jpeg-basic-offset-table", "implicit-vr"])
def test_elements_after_pixel_data_are_de_identified_and_the_output_parses(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path, name: str
) -> None:
    study_uid = str(pydicom.dcmread(inputs[name], stop_before_pixels=True).StudyInstanceUID)
    src = _with_trailing_elements(inputs[name], tmp_path / "in.dcm", study_uid)
    before = pixel_element(src)
    assert before.end < src.stat().st_size, "the elements must follow the pixel data"
    dst = tmp_path / "out.dcm"
    report = deid.deidentify_file(src, dst)
    assert report.outcome is Outcome.PASSED, report.public()
    out = pydicom.dcmread(dst)  # strict: preamble, meta and every element up to the end
    assert "DigitalSignaturesSequence" not in out
    assert "DataSetTrailingPadding" not in out
    assert not [elem for elem in out if elem.tag.group == 0x7FE1]
    assert pixel_element(dst).raw == before.raw
    data = dst.read_bytes()
    for token in (SIGNER_TOKEN, TRAILING_TOKEN, study_uid):
        assert token.encode() not in data


# --------------------------------------------------------------------------
# Malformed input


def _cut_meta(data: bytes) -> tuple[int, bytes]:
    """Offset of the first dataset byte after the file meta group."""
    (meta_length,) = struct.unpack("<I", data[140:144])
    return 144 + meta_length, data[: 144 + meta_length]


def _malformed(kind: str, inputs: dict[str, Path], scratch: Path) -> bytes:
    valid_jpeg, valid_native = inputs["jpeg-basic-offset-table"], inputs["explicit-vr"]
    data = valid_jpeg.read_bytes()
    pixel = pixel_element(valid_jpeg)
    if kind == "non-dicom":
        return b"Patient list, not an image\n" * 40
    if kind == "empty":
        return b""
    if kind == "truncated-encapsulated-pixel-data":
        return data[: (pixel.start + pixel.end) // 2]
    if kind == "truncated-before-sequence-delimiter":
        return data[: pixel.end - 8]
    if kind == "truncated-header":
        dataset_start, _ = _cut_meta(data)
        return data[: (dataset_start + pixel.start) // 2]
    if kind == "fragment-length-past-eof":
        # Value: item tag + BOT length, the BOT, then the first fragment's item header.
        value = pixel.start + 12
        (bot_length,) = struct.unpack("<I", data[value + 4 : value + 8])
        first = value + 8 + bot_length
        assert data[first : first + 4] == b"\xfe\xff\x00\xe0"
        return data[: first + 4] + struct.pack("<I", 0x7FFFFFF0) + data[first + 8 :]
    if kind == "item-tag-corrupted":
        value = pixel.start + 12
        (bot_length,) = struct.unpack("<I", data[value + 4 : value + 8])
        first = value + 8 + bot_length
        return data[:first] + b"\x10\x00\x10\x00" + data[first + 4 :]
    if kind == "missing-transfer-syntax":
        dataset_start, _ = _cut_meta(data)
        meta = pydicom.dcmread(valid_jpeg, stop_before_pixels=True).file_meta
        del meta.TransferSyntaxUID
        buffer = BytesIO()
        write_file_meta_info(buffer, meta, enforce_standard=False)
        return data[:128] + b"DICM" + buffer.getvalue() + data[dataset_start:]
    if kind == "truncated-deflated":
        deflated = inputs["deflated"].read_bytes()
        return deflated[: len(deflated) // 2]
    if kind == "truncated-after-pixel-data":
        study_uid = str(pydicom.dcmread(valid_jpeg, stop_before_pixels=True).StudyInstanceUID)
        trailing = _with_trailing_elements(valid_jpeg, scratch / "trailing.dcm", study_uid)
        whole = trailing.read_bytes()
        return whole[: (pixel.end + len(whole)) // 2]
    if kind == "truncated-native-pixel-data":
        native = valid_native.read_bytes()
        element = pixel_element(valid_native)
        return native[: (element.start + element.end) // 2]
    raise AssertionError(kind)


MALFORMED = [
    "non-dicom",
    "empty",
    "truncated-encapsulated-pixel-data",
    "truncated-before-sequence-delimiter",
    "truncated-header",
    "fragment-length-past-eof",
    "item-tag-corrupted",
    "missing-transfer-syntax",
    "truncated-native-pixel-data",
    "truncated-after-pixel-data",
    "truncated-deflated",
]


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_input_is_quarantined_unreadable_and_nothing_is_written(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "in" / "broken.dcm"
    src.parent.mkdir()
    src.write_bytes(_malformed(kind, inputs, tmp_path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = deid.deidentify_file(src, out_dir / "broken.dcm")
    assert (report.outcome, report.reason) == (Outcome.QUARANTINED, "unreadable"), report.public()
    assert files_in(out_dir) == []


def test_a_header_cut_anywhere_is_quarantined_never_passed_never_raised(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path
) -> None:
    valid = inputs["jpeg-basic-offset-table"]
    data = valid.read_bytes()
    dataset_start, _ = _cut_meta(data)
    end = pixel_element(valid).start
    src, dst = tmp_path / "cut.dcm", tmp_path / "out" / "cut.dcm"
    dst.parent.mkdir()
    verdicts: dict[str, list[int]] = {}
    for cut in range(dataset_start + 1, end, 401):
        src.write_bytes(data[:cut])
        try:
            report = deid.deidentify_file(src, dst)
            verdict = f"{report.outcome.value}/{report.reason}"
        except Exception as exc:  # any exception is the failure being recorded
            verdict = f"raised {type(exc).__name__}"
        if dst.exists():
            verdict += " (output written)"
            dst.unlink()
        verdicts.setdefault(verdict, []).append(cut)
    # A cut before the SOP Instance UID reads as an instance without one: also held back.
    allowed = {"quarantined/unreadable", "quarantined/missing-sop-uids"}
    assert set(verdicts) <= allowed, {k: len(v) for k, v in verdicts.items()}
    assert "quarantined/unreadable" in verdicts


def test_output_exists_only_when_passed_and_no_partial_file_remains(
    deid: Deidentifier, synthetic_study: SyntheticStudy, tmp_path: Path
) -> None:
    outcomes = set()
    for index, src in enumerate(synthetic_study.all_files()):
        dst = tmp_path / f"{index}.dcm"
        report = deid.deidentify_file(src, dst)
        outcomes.add(report.outcome)
        assert dst.exists() == (report.outcome is Outcome.PASSED), (src.name, report.public())
    # All three outcomes were exercised.
    assert outcomes == set(Outcome)
    assert [name for name in files_in(tmp_path) if "partial" in name] == []


# --------------------------------------------------------------------------
# Memory

LARGE_BYTES = 200 * 1024 * 1024
MAX_EXTRA_BYTES = 100 * 1024 * 1024

_MEASURE = """
import json, resource, sys, tracemalloc
from pathlib import Path
from gateway.deid import Deidentifier, load_key, load_profile

small, large, out, key_file = (Path(p) for p in sys.argv[1:5])
deid = Deidentifier(load_profile("research"), load_key(key_file))
deid.deidentify_file(small, out.with_name("warm-up.dcm"))  # lazy imports and caches
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tracemalloc.start()
report = deid.deidentify_file(large, out)
_, traced_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"outcome": report.outcome.value, "traced_peak": traced_peak,
                  "rss_growth": rss_after - rss_before}))
"""


def _sha256_range(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(start)
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pixel_start(path: Path) -> int:
    with path.open("rb") as handle:
        pydicom.dcmread(handle, stop_before_pixels=True)
        return handle.tell()


def test_large_volume_is_streamed_without_loading_the_pixel_data(
    tmp_path: Path, inputs: dict[str, Path], key_file: Path
) -> None:
    large = write_large_volume(tmp_path / "large.dcm", LARGE_BYTES, PlantedPHI.create(41))
    assert large.stat().st_size >= LARGE_BYTES * 0.95
    out = tmp_path / "out" / "large.dcm"
    out.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(inputs["jpeg-basic-offset-table"]), str(large), str(out),
         str(key_file)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["outcome"] == "passed"
    assert measured["traced_peak"] < MAX_EXTRA_BYTES, measured
    assert measured["rss_growth"] < MAX_EXTRA_BYTES, measured
    # Every byte from the pixel data element to the end is the input's.
    assert out.stat().st_size - _pixel_start(out) == large.stat().st_size - _pixel_start(large)
    assert _sha256_range(out, _pixel_start(out)) == _sha256_range(large, _pixel_start(large))


def test_check_file_agrees_with_deidentify_file(
    deid: Deidentifier, inputs: dict[str, Path], tmp_path: Path
) -> None:
    from gateway.deid.stream import check_file

    assert check_file(inputs["jpeg-basic-offset-table"]) is None
    broken = tmp_path / "broken.dcm"
    for kind in ("truncated-header", "item-tag-corrupted", "non-dicom", "truncated-after-pixel-data"):
        broken.write_bytes(_malformed(kind, inputs, tmp_path))
        reason = check_file(broken)
        assert reason is not None and "readable" in reason
        assert deid.deidentify_file(broken, tmp_path / "out.dcm").outcome is Outcome.QUARANTINED

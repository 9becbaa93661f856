"""Write the malformed-input regression corpus: ``python -m tests.fuzz.make_corpus [DIR]``.

Every case is a Part 10 file whose File Meta is valid (so a sender can offer
it in a C-STORE) and whose data set is broken in one way. The files are
small; :func:`huge_value` builds the 100 MB case at test time instead.
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

SR = "1.2.840.10008.5.1.4.1.1.88.33"
SOP_INSTANCE = "2.25.170000000000000000000000000000000001"
CORPUS = Path(__file__).parent / "corpus"


def _element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the real one."""
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, size) + value
    return struct.pack("<HH2sH", group, elem, vr, size & 0xFFFF) + value


def _valid_body(sop_instance: str = SOP_INSTANCE) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = SR
    ds.SOPInstanceUID = sop_instance
    ds.PatientName = "PHIFUZZNAME^PHIFUZZGIVEN"
    ds.PatientID = "PHIFUZZID"
    ds.StudyInstanceUID = "2.25.170000000000000000000000000000000002"
    ds.SeriesInstanceUID = "2.25.170000000000000000000000000000000003"
    ds.Modality = "SR"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def part10(body: bytes, syntax: str = ExplicitVRLittleEndian, sop_instance: str = SOP_INSTANCE) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(SR)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    return buffer.getvalue() + body


def _deep(levels: int) -> bytes:
    """``levels`` nested undefined-length sequences, each with one undefined-length item."""
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    opening = _element(0x0040, 0xA730, b"SQ", b"", 0xFFFFFFFF) + item
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return opening * levels + closing * levels


def _cases() -> dict[str, Callable[[], bytes]]:
    body = _valid_body()
    rng = random.Random(7)
    return {
        "length-past-end": lambda: part10(body + _element(0x0008, 0x103E, b"LO", b"PHIFUZZ", 0x7FF0)),
        "length-too-short": lambda: part10(body + _element(0x0010, 0x1000, b"LO", b"PHIFUZZOTHER", 3)),
        "sequence-length-past-end": lambda: part10(
            body + _element(0x0040, 0xA730, b"SQ", struct.pack("<HHL", 0xFFFE, 0xE000, 64), 1 << 30)
        ),
        "item-without-delimiter": lambda: part10(
            body + _element(0x0040, 0xA730, b"SQ", b"", 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + _element(0x0008, 0x0100, b"SH", b"T1")
        ),
        "item-tag-garbage": lambda: part10(
            body + _element(0x0040, 0xA730, b"SQ", struct.pack("<HHL", 0x1234, 0x5678, 4) + b"abcd")
        ),
        "nesting-10000": lambda: part10(body + _deep(10_000)),
        "unknown-vr": lambda: part10(body + _element(0x0010, 0x2160, b"ZZ", b"PHIFUZZ")),
        "wrong-vr-us-name": lambda: part10(
            _valid_body().replace(b"PN", b"US", 1)
        ),
        "truncated-pixel-data": lambda: part10(body + _element(0x7FE0, 0x0010, b"OW", b"\x00" * 10, 4096)),
        "truncated-encapsulated": lambda: part10(
            body + _element(0x7FE0, 0x0010, b"OB", struct.pack("<HHL", 0xFFFE, 0xE000, 0), 0xFFFFFFFF)
            + struct.pack("<HHL", 0xFFFE, 0xE000, 100_000) + b"\xff\xd8"
        ),
        "meta-says-implicit": lambda: part10(body, syntax=ImplicitVRLittleEndian),
        "meta-other-instance": lambda: part10(body, sop_instance="2.25.99"),
        "not-dicom": lambda: part10(rng.randbytes(4096)),
        "empty-data-set": lambda: part10(b""),
        "truncated-element-header": lambda: part10(body + b"\x10\x00\x10"),
    }


def write_corpus(directory: Path = CORPUS) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in _cases().items():
        path = directory / f"{name}.dcm"
        path.write_bytes(build())
        written.append(path)
    return written


def huge_value(path: Path, size: int = 100 * 2**20) -> Path:
    """A data set with a LO (at most 64 characters) of ``size`` bytes."""
    with path.open("wb") as out:
        out.write(part10(_valid_body()))
        out.write(struct.pack("<HH2sHL", 0x0008, 0x1030, b"UN", 0, size))  # LO given as UN
        chunk = b"PHIFUZZHUGE " * 8192
        for _ in range(size // len(chunk)):
            out.write(chunk)
        out.write(b" " * (size % len(chunk)))
    return path


if __name__ == "__main__":
    for written_path in write_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS):
        print(written_path)

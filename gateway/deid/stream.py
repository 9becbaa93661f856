"""File-to-file de-identification that never holds the pixel data in memory.

The header (everything before the pixel data element) is parsed with
pydicom, de-identified, and written; the pixel data element is then copied
byte for byte, by the kernel where it can (``copy_file_range``), so a
multi-gigabyte slide costs the memory of its header alone. Elements after the
pixel data (rare: signatures, padding) are de-identified with the header and
written after it. The output keeps the input's transfer syntax.

Deflated datasets and OVERVIEW images that are to be redacted are read whole
(they are small); anything larger than ``max_whole_bytes`` is quarantined.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

from gateway import __version__
from gateway.deid.iod import pixel_data_sop_classes
from gateway.deid.policy import image_flavor
from gateway.deid.report import DeidReport, Outcome, PixelReference

if TYPE_CHECKING:
    from gateway.deid.engine import Deidentifier

#: Pixel Data, Float Pixel Data and Double Float Pixel Data.
_PIXEL_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_UNDEFINED = 0xFFFFFFFF
_KNOWN_VRS = frozenset(vr.value.encode("ascii") for vr in VR)
#: This gateway's implementation identity in the file meta (a 2.25 UUID UID).
IMPLEMENTATION_CLASS_UID = "2.25.227128497617390133914612893424063658247"
IMPLEMENTATION_VERSION = f"DEIDGW_{__version__}"[:16]
MAX_WHOLE_BYTES = 512 * 1024 * 1024


class MalformedError(ValueError):
    """The file is not a DICOM instance this gateway can read safely."""


def deidentify_file(
    deid: Deidentifier,
    src: Path,
    dst: Path,
    *,
    explain: bool = False,
    max_whole_bytes: int = MAX_WHOLE_BYTES,
    durable: bool = True,
    pixels_by_reference: bool = False,
) -> DeidReport:
    """De-identify ``src`` into ``dst``; ``dst`` is written only when passed.

    Never raises for what is in the file: anything that cannot be read is
    quarantined as ``unreadable``, a failure inside the engine as
    ``internal-error``, a failure to write as ``rewrite-failed``. The output is
    written to a temporary name beside ``dst`` and renamed, so ``dst`` either
    holds a whole instance or does not exist; ``durable`` flushes it to disk
    first (a forwarder's scratch copy, made again after a crash, needs not).
    With ``pixels_by_reference``, pixel data that would be copied unchanged
    is left in ``src``: ``dst`` holds the rest, and the report's
    ``pixel_reference`` says where the pixel data goes (:func:`fill_pixels`
    makes the whole file).
    """
    memo = None if explain else deid.memo
    probe = memo.probe(src) if memo is not None else None
    if memo is not None and probe is not None:
        try:
            reused = memo.rewrite(
                deid, probe, src, dst, durable=durable, pixels_by_reference=pixels_by_reference
            )
        except Exception:  # a full run decides, and reports whatever the problem is
            _temporary(dst).unlink(missing_ok=True)
            reused = None
        if reused is not None:
            return reused
    redact = deid.profile.pixels.overview in ("redact", "replace")
    try:
        source = _read(src, redact, max_whole_bytes)
    except _RefusedError as refused:
        return refused.report
    except Exception as exc:  # whatever the parser trips over, the file is unreadable
        return DeidReport().stop(
            Outcome.QUARANTINED, "unreadable", f"not a readable DICOM instance ({type(exc).__name__})"
        )
    try:
        report = deid.deidentify(source.dataset, has_pixels=source.has_pixels, explain=explain)
    except Exception as exc:  # fail closed: an engine failure holds the instance back
        return _refuse(source.dataset, "internal-error", f"de-identification failed ({type(exc).__name__})")
    if report.outcome is not Outcome.PASSED:
        return report
    try:
        if source.pixel_extent is None:
            _write_whole(source.dataset, source.syntax, dst, durable)
            header_length = None
        else:
            header_length, report.pixel_reference = _write_streamed(
                source.dataset,
                source.syntax,
                src,
                source.pixel_extent,
                source.pixel_tag,
                dst,
                durable,
                by_reference=pixels_by_reference,
            )
    except Exception as exc:  # nothing half-written is left, and the instance is held back
        _temporary(dst).unlink(missing_ok=True)
        return report.stop(
            Outcome.QUARANTINED,
            "rewrite-failed",
            f"the de-identified instance could not be written ({type(exc).__name__})",
        )
    if (
        memo is not None
        and probe is not None
        and header_length is not None
        and source.pixel_extent == probe.pixel_extent
    ):
        with contextlib.suppress(Exception):  # not kept: the next instance takes a full run
            memo.learn(deid, probe, source.dataset, report, dst, header_length)
    return report


def check_file(src: Path, pixel_classes: Collection[str] | None = None) -> str | None:
    """Whether ``src`` is an instance the engine can read: ``None`` if so,
    otherwise a PHI-free sentence saying why not.

    The same parse and structure checks :func:`deidentify_file` makes, without
    de-identifying and without decoding values: cheap enough to run before
    acknowledging a C-STORE (the header's structure is walked, the pixel data
    only item header by item header). ``pixel_classes`` are the SOP Classes
    whose IOD holds pixel data (:func:`~gateway.deid.iod.pixel_data_sop_classes`,
    looked up when not given).
    """
    try:
        _read(src, False, MAX_WHOLE_BYTES, decode=False, pixel_classes=pixel_classes)
    except _RefusedError as refused:
        return refused.report.detail
    except Exception as exc:  # whatever the parser trips over, the file is unreadable
        return f"not a readable DICOM instance ({type(exc).__name__}: {_safe_reason(exc)})"
    return None


def _safe_reason(exc: Exception) -> str:
    """Only this module's own messages (fixed text, no values) are repeated."""
    return str(exc) if isinstance(exc, MalformedError) else "parse error"


@dataclass
class _Source:
    """A parsed input: the header (or, read whole, the dataset) and where its
    pixel data element lies in the file (``None`` when read whole)."""

    dataset: Dataset
    syntax: UID
    pixel_extent: tuple[int, int] | None
    pixel_tag: int | None
    has_pixels: bool | None


class _RefusedError(Exception):
    def __init__(self, report: DeidReport) -> None:
        super().__init__(report.reason)
        self.report = report


def _read(
    src: Path,
    redact_overviews: bool,
    max_whole_bytes: int,
    *,
    decode: bool = True,
    pixel_classes: Collection[str] | None = None,
) -> _Source:
    """Parse and check ``src``. ``decode=False`` leaves element values raw
    (pydicom decodes them on first use): the structure is still checked, and
    it is several times cheaper, for a check before acknowledging."""
    with src.open("rb") as fp:
        header = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        size = os.fstat(fp.fileno()).st_size
        syntax = _transfer_syntax(header)
        pixel_start = fp.tell()
        whole = syntax == DeflatedExplicitVRLittleEndian or (
            redact_overviews and image_flavor(header) == "OVERVIEW"
        )
        if whole:
            if size > max_whole_bytes:
                raise _RefusedError(
                    _refuse(
                        header,
                        "too-large-to-rewrite",
                        "the instance must be rewritten whole but is too large",
                    )
                )
            fp.seek(0)
            dataset = pydicom.dcmread(fp, force=True)
            if decode:
                _decode_all(dataset)
            _check_meta_agrees(dataset)
            return _Source(dataset, syntax, None, None, None)
        pixel_end, pixel_tag = _pixel_extent(fp, pixel_start, size, syntax)
        if pixel_end < size:
            fp.seek(pixel_end)
            header.update(read_dataset(fp, syntax.is_implicit_VR, syntax.is_little_endian))
        # pydicom reads a value cut short without complaint: check the structure
        # of everything that is parsed (not the pixel data, which is copied).
        dataset_start = _skip_file_meta(fp)
        _check_complete(fp, dataset_start, pixel_start, syntax)
        _check_complete(fp, pixel_end, size, syntax)
    if decode:
        _decode_all(header)
    if "SOPClassUID" not in header or "SOPInstanceUID" not in header:
        raise MalformedError("the data set has no SOP Class or SOP Instance UID")
    _check_meta_agrees(header)
    sop_class = str(header.get("SOPClassUID", ""))
    if pixel_classes is None:
        pixel_classes = pixel_data_sop_classes()
    if pixel_tag is None and sop_class in pixel_classes:
        raise MalformedError("the IOD has pixel data but the file has none (truncated?)")
    return _Source(header, syntax, (pixel_start, pixel_end), pixel_tag, pixel_tag is not None)


def _skip_file_meta(fp: BinaryIO) -> int:
    """Where the dataset starts: after the preamble and the group 0002 elements
    (always explicit VR little endian)."""
    fp.seek(0)
    head = fp.read(132)
    start = 132 if head[128:132] == b"DICM" else 0
    fp.seek(start)
    data = fp.read(64 * 1024)  # the file meta is small
    return start + _file_meta_end(data, 0)


def _file_meta_end(data: bytes, offset: int) -> int:
    """Where the group 0002 elements starting at ``offset`` in ``data`` end."""
    while len(data) - offset >= 8 and struct.unpack_from("<H", data, offset)[0] == 0x0002:
        offset = _element_end(data, offset, implicit=False, little=True)
    return int(offset)


def _check_complete(fp: BinaryIO, start: int, end: int, syntax: UID) -> None:
    """Raise MalformedError unless [start, end) of the file is a whole run of
    elements. The region is parsed already (it is the header), so reading it
    again costs no more memory than pydicom's copy."""
    fp.seek(start)
    data = fp.read(end - start)
    if len(data) != end - start:
        raise MalformedError("the file is shorter than its header")
    offset = 0
    while offset < len(data):
        offset = _element_end(data, offset, syntax.is_implicit_VR, syntax.is_little_endian)


def _element_end(data: bytes, offset: int, implicit: bool, little: bool, bound: int | None = None) -> int:
    """The end of the element (or item) at ``offset`` in ``data``. Sequences and
    items are walked, of defined length or not: a sequence must hold items,
    an item elements, and every length must fit in what holds it (``bound``,
    by default the end of ``data``)."""
    endian = "<" if little else ">"
    limit = len(data) if bound is None else bound
    if limit - offset < 8:
        raise MalformedError("truncated element header")
    group, element = struct.unpack_from(endian + "HH", data, offset)
    is_item = (group, element) == (0xFFFE, 0xE000)
    vr = data[offset + 4 : offset + 6]
    if group == 0xFFFE or implicit:
        (length,) = struct.unpack_from(endian + "L", data, offset + 4)
        body = offset + 8
        vr = b"SQ" if group == 0xFFFE else _implicit_vr((group << 16) | element)
    elif vr not in _KNOWN_VRS:
        raise MalformedError("an element has an unknown VR")
    elif group % 2 == 0 and vr != b"UN" and vr not in _dictionary_vrs((group << 16) | element):
        raise MalformedError("an element's VR contradicts the data dictionary")
    elif vr in _LONG_VRS:
        if limit - offset < 12:
            raise MalformedError("truncated element header")
        (length,) = struct.unpack_from(endian + "L", data, offset + 8)
        body = offset + 12
    else:
        (length,) = struct.unpack_from(endian + "H", data, offset + 6)
        body = offset + 8
    nested = is_item or vr == b"SQ"
    inner_implicit = implicit or (vr == b"UN" and not is_item)  # UN sequences are implicit VR
    if length != _UNDEFINED:
        end = body + length
        if end > limit:
            raise MalformedError("an element runs past the end of its region")
        if length > 0xFFFF and vr in (b"UN", b"") and group % 2 == 0 and _short_only((group << 16) | element):
            raise MalformedError("a value is longer than its VR can hold")
        if nested:
            _walk_children(data, body, end, inner_implicit, little, items=not is_item)
        return int(end)
    if vr not in (b"SQ", b"UN", b""):
        raise MalformedError("undefined length on a value that cannot have one")
    delimiter = (0xFFFE, 0xE00D) if is_item else (0xFFFE, 0xE0DD)
    cursor = body
    while True:
        if limit - cursor < 8:
            raise MalformedError("a sequence or item has no delimiter")
        child = struct.unpack_from(endian + "HH", data, cursor)
        if child == delimiter:
            return cursor + 8
        if not is_item and child != (0xFFFE, 0xE000):
            raise MalformedError("a sequence holds something other than items")
        cursor = _element_end(data, cursor, inner_implicit, little, limit)


def _walk_children(data: bytes, start: int, end: int, implicit: bool, little: bool, items: bool) -> None:
    """Check the items of a sequence (``items``) or the elements of an item."""
    endian = "<" if little else ">"
    cursor = start
    while cursor < end:
        if end - cursor < 8:
            raise MalformedError("truncated element header")
        if items and struct.unpack_from(endian + "HH", data, cursor) != (0xFFFE, 0xE000):
            raise MalformedError("a sequence holds something other than items")
        cursor = _element_end(data, cursor, implicit, little, end)


@functools.lru_cache(maxsize=4096)
def _dictionary_vrs(tag: int) -> frozenset[bytes]:
    """The VRs the data dictionary allows for a public tag; every VR for a tag
    it does not know."""
    try:
        return frozenset(v.strip().encode("ascii") for v in dictionary_VR(tag).split(" or "))
    except KeyError:
        return _KNOWN_VRS


def _short_only(tag: int) -> bool:
    """True when every VR the dictionary allows for ``tag`` has a 16-bit length
    (so no value of it can exceed 65,535 bytes, whatever its encoding says)."""
    allowed = _dictionary_vrs(tag)
    return allowed is not _KNOWN_VRS and not (allowed & (_LONG_VRS | {b"SQ"}))


def _implicit_vr(tag: int) -> bytes:
    """In implicit VR only the dictionary tells a sequence from other values."""
    try:
        return b"SQ" if dictionary_VR(tag) == "SQ" else b""
    except KeyError:
        return b""


def _check_meta_agrees(dataset: Dataset) -> None:
    """A file whose meta names another instance than its dataset is not trusted."""
    meta = dataset.file_meta
    for meta_keyword, keyword in (
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
        ("MediaStorageSOPClassUID", "SOPClassUID"),
    ):
        if meta_keyword in meta and keyword in dataset and meta[meta_keyword].value != dataset[keyword].value:
            raise MalformedError(f"the file meta's {meta_keyword} contradicts the dataset")


def _decode_all(dataset: Dataset) -> None:
    """Decode every element now, so that a value cut short fails here, as
    unreadable, and not half-way through de-identification."""
    for _ in dataset.iterall():
        pass


def _refuse(header: Dataset, reason: str, detail: str) -> DeidReport:
    report = DeidReport(sop_class_uid=str(header.get("SOPClassUID", "")), image_type=image_flavor(header))
    return report.stop(Outcome.QUARANTINED, reason, detail)


def _transfer_syntax(header: Dataset) -> UID:
    meta = getattr(header, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        raise MalformedError("no Transfer Syntax UID in the file meta")
    uid = UID(str(syntax))
    if not uid.is_transfer_syntax:
        raise MalformedError("unknown transfer syntax")
    return uid


def _pixel_extent(fp: BinaryIO, start: int, size: int, syntax: UID) -> tuple[int, int | None]:
    """Where the pixel data element at ``start`` ends, and its tag.

    Returns ``(start, None)`` when no pixel data element starts there. For
    encapsulated pixel data (undefined length) the item headers are walked
    with seeks, without reading the fragments.
    """
    if start >= size:
        return start, None
    endian = "<" if syntax.is_little_endian else ">"
    fp.seek(start)
    head = fp.read(8)
    if len(head) < 8:
        raise MalformedError("truncated element header")
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = (group << 16) | element
    if tag not in _PIXEL_TAGS:
        return start, None
    if syntax.is_implicit_VR:
        (length,) = struct.unpack(endian + "L", head[4:8])
        offset = start + 8
    elif head[4:6] in _LONG_VRS:
        extra = fp.read(4)
        if len(extra) < 4:
            raise MalformedError("truncated element header")
        (length,) = struct.unpack(endian + "L", extra)
        offset = start + 12
    else:
        (length,) = struct.unpack(endian + "H", head[6:8])
        offset = start + 8
    if length != _UNDEFINED:
        end = offset + length
        if end > size:
            raise MalformedError("pixel data runs past the end of the file")
        return end, tag
    while True:
        fp.seek(offset)
        item = fp.read(8)
        if len(item) < 8:
            raise MalformedError("encapsulated pixel data has no sequence delimiter")
        item_group, item_element, item_length = struct.unpack(endian + "HHL", item)
        if (item_group, item_element) == (0xFFFE, 0xE0DD):
            return offset + 8, tag
        if (item_group, item_element) != (0xFFFE, 0xE000) or item_length == _UNDEFINED:
            raise MalformedError("malformed item in encapsulated pixel data")
        offset += 8 + item_length
        if offset > size:
            raise MalformedError("a pixel data fragment runs past the end of the file")


def _file_meta(dataset: Dataset, syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _temporary(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.partial")


def _write_whole(dataset: Dataset, syntax: UID, dst: Path, durable: bool = True) -> None:
    dataset.file_meta = _file_meta(dataset, syntax)
    tmp = _temporary(dst)
    with tmp.open("wb") as out:
        pydicom.dcmwrite(out, dataset, enforce_file_format=True)
        out.flush()
        if durable:
            os.fsync(out.fileno())
    tmp.replace(dst)


def _write_streamed(
    header: Dataset,
    syntax: UID,
    src: Path,
    extent: tuple[int, int],
    pixel_tag: int | None,
    dst: Path,
    durable: bool = True,
    *,
    by_reference: bool = False,
) -> tuple[int, PixelReference | None]:
    """Write the de-identified ``header``, then the input's pixel data (or
    leave it, ``by_reference``); return the length of what precedes the pixel
    data, and where the pixel data is when it was left."""
    tail = Dataset()
    if pixel_tag is not None:
        for tag in [t for t in header.keys() if int(t) > pixel_tag]:
            tail[tag] = header[tag]
            del header[tag]
    header.file_meta = _file_meta(header, syntax)
    encoded = DicomBytesIO()
    pydicom.dcmwrite(encoded, header, enforce_file_format=True)
    trailer = b""
    if len(tail):
        buffer = DicomBytesIO()
        buffer.is_little_endian = syntax.is_little_endian
        buffer.is_implicit_VR = syntax.is_implicit_VR
        write_dataset(buffer, tail)
        trailer = buffer.getvalue()
    head = encoded.getvalue()
    reference = _write_header_and_pixels(
        head, src, extent, dst, trailer, durable=durable, by_reference=by_reference
    )
    return len(head), reference


def _write_header_and_pixels(
    head: bytes,
    src: Path,
    extent: tuple[int, int],
    dst: Path,
    tail: bytes = b"",
    *,
    durable: bool = True,
    by_reference: bool = False,
) -> PixelReference | None:
    """Write ``head``, the bytes ``extent`` of ``src`` and ``tail`` to a
    temporary name beside ``dst`` and rename it; ``durable`` flushes it to
    disk first. With ``by_reference`` the bytes of ``src`` are not written,
    and where they go is returned."""
    start, end = extent
    reference = PixelReference(src, start, end, len(head)) if by_reference and end > start else None
    tmp = _temporary(dst)
    with tmp.open("wb") as out:
        out.write(head)
        position = len(head)
        if end > start and reference is None:
            with src.open("rb") as source:
                _copy_range(source, out, start, end - start, position)
            out.seek(position + end - start)
        if tail:
            out.write(tail)
        out.flush()
        if durable:
            os.fsync(out.fileno())
    tmp.replace(dst)
    return reference


def fill_pixels(dst: Path, reference: PixelReference, *, durable: bool = False) -> None:
    """Make ``dst``, written with its pixel data by reference, the whole instance."""
    with dst.open("rb") as partial:
        head = partial.read(reference.at)
        tail = partial.read()
    if len(head) != reference.at:
        raise MalformedError("the de-identified header is shorter than recorded")
    _write_header_and_pixels(head, reference.source, (reference.start, reference.end), dst, tail,
                             durable=durable)  # fmt: skip


def _copy_range(source: BinaryIO, out: BinaryIO, offset: int, count: int, out_offset: int) -> None:
    """Copy ``count`` bytes, in the kernel where the filesystem allows it."""
    src_fd, dst_fd = source.fileno(), out.fileno()
    try:
        while count:
            done = os.copy_file_range(src_fd, dst_fd, count, offset, out_offset)
            if done == 0:
                raise MalformedError("the source file shrank while being copied")
            offset, out_offset, count = offset + done, out_offset + done, count - done
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        source.seek(offset)
        out.seek(out_offset)
        while count:
            chunk = source.read(min(count, 8 * 1024 * 1024))
            if not chunk:
                raise MalformedError("the source file shrank while being copied") from exc
            out.write(chunk)
            count -= len(chunk)

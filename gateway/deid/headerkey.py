"""The key of an instance's header: its bytes without the per-instance values.

The instances of a whole-slide series (the concatenations of a level, a study
sent as many instances, the copies a queue sends again) carry the same header
but for a few per-instance attributes: SOP Instance UID, Instance Number and
the concatenation numbers. The key is a SHA-256 of every byte of the header
(preamble, file meta and the data set up to the pixel data) except the values
of those attributes and of the two file meta elements derived from them (the
group length and the Media Storage SOP Instance UID); their tags are in it,
so the set of attributes is the same. Two headers with one key are the same
bytes but for those values.

The walk that finds the elements only finds where each one ends, without
decoding or checking anything, which is about ten times cheaper than the
checked walk of :mod:`gateway.deid.stream`: work already done for a header
with the same key (the receiver's structure check, the engine's
de-identified header) is reused, and everything else takes the full path,
which checks.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from gateway.deid.stream import _PIXEL_TAGS, MalformedError, _pixel_extent, check_file
from gateway.deid.stream import _element_end as checked_element_end

#: The per-instance attributes: SOP Instance UID, Instance Number, In-concatenation
#: Number and Concatenation Frame Offset Number.
PER_INSTANCE_TAGS = frozenset({0x00080018, 0x00200013, 0x00209162, 0x00209228})
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
META_GROUP_LENGTH = 0x00020000
MEDIA_SOP_INSTANCE_UID = 0x00020003
_TRANSFER_SYNTAX_UID = 0x00020010
PREFIX = 132  # preamble and "DICM"
#: Headers are read in steps up to this size; a larger header has no key.
MAX_HEADER_BYTES = 8 * 1024 * 1024
_FIRST_READ = 256 * 1024
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
_TAG = struct.Struct("<HH")
_U32 = struct.Struct("<L")
_U16 = struct.Struct("<H")
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQUENCE_END = (0xFFFE, 0xE0DD)


@dataclass(frozen=True)
class HeaderKey:
    """An input's header, read raw: its key and what the key leaves out."""

    key: bytes
    syntax: UID
    #: The per-instance elements as they are in the file (:attr:`per_instance`
    #: decodes them).
    per_instance_raw: bytes
    #: The file meta's group length element and Media Storage SOP Instance UID
    #: element, as they are in the file, and where the file meta ends.
    meta_group_length: bytes
    media_sop_instance_uid: bytes
    meta_end: int
    #: Where the pixel data element starts and ends (the end of the file).
    pixel_extent: tuple[int, int]
    #: The data set's SOP Instance UID, read raw (without its padding).
    sop_instance_uid: str
    #: The data set's SOP Class UID (part of the key), if it has one.
    sop_class_uid: str | None = None

    @functools.cached_property
    def per_instance(self) -> Dataset:
        """The per-instance elements, decoded."""
        return read_dataset(io.BytesIO(self.per_instance_raw), self.syntax.is_implicit_VR, True)


class _CutShortError(Exception):
    """The read ended inside the header."""


def header_key(src: Path, *, decoded: bool = True) -> HeaderKey | None:
    """The key of ``src``'s header; ``None`` for a file this does not handle
    (no pixel data, elements after it, big endian or deflated, a header over
    :data:`MAX_HEADER_BYTES`, or anything odd: the full path decides).

    ``decoded`` also decodes the per-instance values, and gives ``None`` when
    one does not decode or is empty or a sequence: what the engine's reuse of
    a header needs. The receiver's structure check, which decodes no value,
    does without.
    """
    try:
        return _header_key(src, decoded)
    except Exception:  # malformed, deeply nested, unreadable: all for the full path
        return None


def _header_key(src: Path, decoded: bool) -> HeaderKey | None:
    with src.open("rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        want = min(size, _FIRST_READ)
        while True:
            fp.seek(0)
            data = fp.read(want)
            try:
                parsed = _parse(data)
                break
            except _CutShortError:
                if want >= min(size, MAX_HEADER_BYTES):
                    return None
                want = min(size, want * 8, MAX_HEADER_BYTES)
        if parsed is None:
            return None
        digest, syntax, raw, group_length, media_uid, meta_end, pixel_start, sop_class, sop_instance = parsed
        pixel_end, pixel_tag = _pixel_extent(fp, pixel_start, size, syntax)
    if pixel_tag is None or pixel_end != size or not sop_instance:
        return None
    digest.update(b"P" + _U32.pack(pixel_tag))
    key = HeaderKey(
        digest.digest(),
        syntax,
        raw,
        group_length,
        media_uid,
        meta_end,
        (pixel_start, pixel_end),
        sop_instance,
        sop_class,
    )
    if decoded:
        for elem in key.per_instance:  # a value that does not decode is for the full path
            if elem.VR == "SQ" or not elem.value:
                return None
        if str(key.per_instance[SOP_INSTANCE_UID].value) != sop_instance:
            return None
    return key


def _parse(
    data: bytes,
) -> tuple[hashlib._Hash, UID, bytes, bytes, bytes, int, int, str | None, str] | None:
    """Key the header in ``data``. Every piece fed to the hash is tagged and
    length-prefixed, so that one key means one sequence of pieces."""
    if len(data) < PREFIX + 8:
        raise _CutShortError
    if data[128:PREFIX] != b"DICM":
        return None
    digest = hashlib.sha256(data[:PREFIX])
    offset, syntax = PREFIX, None
    group_length = media_uid = b""
    while True:
        if offset + 8 > len(data):
            raise _CutShortError
        group, element = _TAG.unpack_from(data, offset)
        if group != 0x0002:
            break
        end = _element_end(data, offset, implicit=False)
        tag = (group << 16) | element
        if tag == _TRANSFER_SYNTAX_UID:
            syntax = UID(data[offset + 8 : end].rstrip(b"\0 ").decode("ascii"))
        if tag == META_GROUP_LENGTH:
            group_length = data[offset:end]
        elif tag == MEDIA_SOP_INSTANCE_UID:
            media_uid = data[offset:end]
        else:
            _piece(digest, b"M", data[offset:end])
        offset = end
    meta_end = offset
    if syntax is None or not syntax.is_transfer_syntax or not syntax.is_little_endian:
        return None
    if syntax == DeflatedExplicitVRLittleEndian:
        return None
    implicit = syntax.is_implicit_VR
    raw = bytearray()
    sop_class: str | None = None
    sop_instance = ""
    while True:
        if offset + 8 > len(data):
            raise _CutShortError
        group, element = _TAG.unpack_from(data, offset)
        tag = (group << 16) | element
        if tag in _PIXEL_TAGS:
            return (digest, syntax, bytes(raw), group_length, media_uid, meta_end, offset, sop_class,
                    sop_instance)  # fmt: skip
        end = _element_end(data, offset, implicit)
        if tag in (SOP_CLASS_UID, SOP_INSTANCE_UID):
            short = implicit or data[offset + 4 : offset + 6] not in _LONG_VRS
            value = data[offset + (8 if short else 12) : end].rstrip(b"\0 ").decode("ascii", "replace")
            if tag == SOP_CLASS_UID:
                sop_class = value
            else:
                sop_instance = value
        if tag in PER_INSTANCE_TAGS:
            digest.update(b"V" + _U32.pack(tag))
            raw += data[offset:end]
        else:
            _piece(digest, b"E", data[offset:end])
        offset = end


def _piece(digest: hashlib._Hash, kind: bytes, piece: bytes) -> None:
    digest.update(kind + _U32.pack(len(piece)))
    digest.update(piece)


def _element_end(data: bytes, offset: int, implicit: bool) -> int:
    """Where the element at ``offset`` ends (little endian)."""
    size = len(data)
    if offset + 8 > size:
        raise _CutShortError
    if implicit:
        (length,) = _U32.unpack_from(data, offset + 4)
        body = offset + 8
        inner_implicit = True
    else:
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > size:
                raise _CutShortError
            (length,) = _U32.unpack_from(data, offset + 8)
            body = offset + 12
        else:
            (length,) = _U16.unpack_from(data, offset + 6)
            body = offset + 8
        inner_implicit = vr == b"UN"  # an undefined-length UN is an implicit VR sequence
    if length != _UNDEFINED:
        if body + length > size:
            raise _CutShortError
        return int(body + length)
    return _sequence_end(data, body, inner_implicit)


def _sequence_end(data: bytes, cursor: int, implicit: bool) -> int:
    """The end of an undefined-length sequence whose first item is at ``cursor``."""
    size = len(data)
    while True:
        if cursor + 8 > size:
            raise _CutShortError
        tag = _TAG.unpack_from(data, cursor)
        if tag == _SEQUENCE_END:
            return cursor + 8
        if tag != _ITEM:
            raise ValueError("a sequence holds something other than items")
        (length,) = _U32.unpack_from(data, cursor + 4)
        cursor += 8
        if length != _UNDEFINED:
            cursor += length
            continue
        while True:
            if cursor + 8 > size:
                raise _CutShortError
            if _TAG.unpack_from(data, cursor) == _ITEM_END:
                cursor += 8
                break
            cursor = _element_end(data, cursor, implicit)


class CheckedHeaders:
    """Keys of headers that passed :func:`~gateway.deid.stream.check_file`.

    An instance whose header has the key of one that passed differs from it
    in its per-instance values only: those elements and the two file meta
    elements left out of the key are checked as the full check would, the
    pixel data was walked by :func:`header_key`, and the rest is bytes that
    passed. Thread-safe; the ``capacity`` most recent keys are kept.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        #: Instances checked through a known key, and by a full check.
        self.hits = 0
        self.misses = 0

    def check(self, src: Path, pixel_classes: Collection[str] | None = None) -> str | None:
        """:func:`~gateway.deid.stream.check_file`, skipping what is known to pass."""
        return self.check_keyed(src, header_key(src), pixel_classes)

    def check_keyed(
        self, src: Path, key: HeaderKey | None, pixel_classes: Collection[str] | None = None
    ) -> str | None:
        """:meth:`check` with ``src``'s :func:`header_key` already at hand."""
        if key is not None and self._known(key.key) and _rest_is_sound(key):
            self.hits += 1
            return None
        self.misses += 1
        problem = check_file(src, pixel_classes)
        if problem is None and key is not None:
            with self._lock:
                self._keys[key.key] = None
                while len(self._keys) > self.capacity:
                    self._keys.popitem(last=False)
        return problem

    def _known(self, key: bytes) -> bool:
        with self._lock:
            if key not in self._keys:
                return False
            self._keys.move_to_end(key)
            return True


def _rest_is_sound(key: HeaderKey) -> bool:
    """The checks of the full path on what the key leaves out."""
    try:
        if _checked_end(key.per_instance_raw, key.syntax.is_implicit_VR) != len(key.per_instance_raw):
            return False
        if _checked_end(key.media_sop_instance_uid, False) != len(key.media_sop_instance_uid):
            return False
        if key.meta_group_length:
            if _checked_end(key.meta_group_length, False) != len(key.meta_group_length):
                return False
            (value,) = _U32.unpack_from(key.meta_group_length, 8)
            if value != key.meta_end - PREFIX - len(key.meta_group_length):
                return False
    except (MalformedError, struct.error):
        return False
    media = key.media_sop_instance_uid[8:].rstrip(b"\0 ").decode("ascii", "replace")
    return media == key.sop_instance_uid


def _checked_end(raw: bytes, implicit: bool) -> int:
    offset = 0
    while offset < len(raw):
        offset = checked_element_end(raw, offset, implicit, True)
    return offset


__all__ = ["MAX_HEADER_BYTES", "PER_INSTANCE_TAGS", "CheckedHeaders", "HeaderKey", "header_key"]

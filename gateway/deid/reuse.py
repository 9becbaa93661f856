"""Reuse of a de-identified header across the instances of a series.

The instances of a whole-slide series (the concatenations of a level, the
many instances a scanner splits a study into, the copies a queue sends again)
carry the same header but for a few per-instance attributes: SOP Instance
UID, Instance Number and the concatenation numbers. Parsing, de-identifying
and encoding that header costs pydicom tens of milliseconds per instance
while the pixel data passes through untouched, so the result of the first
run is kept and the next instances with the same header are rewritten from
it. Nothing is reused that is not provably what a full run writes:

* The key (:mod:`gateway.deid.headerkey`) covers every byte of the header
  but the values of the per-instance attributes and of the two file meta
  elements derived from them.
* What the engine did to each per-instance attribute is read off the first
  run (kept, replaced through the keyed UID map, or removed); anything else,
  or an empty value, makes the header not reusable.
* The identifying values the per-instance attributes carry (harvested as on
  the full run) are searched for in the reused bytes, and the new values go
  through the first run's output scanner; any hit falls back to a full run.
* The stored header is the bytes the first run wrote, split into elements,
  and it is stored only when re-assembling it with the first instance's own
  values gives those bytes back exactly.

Instances with elements after the pixel data, or read whole (deflated, or
OVERVIEW images to redact), or de-identified with ``explain``, always take
the full run.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.deid.harvest import harvest
from gateway.deid.headerkey import (
    MEDIA_SOP_INSTANCE_UID,
    META_GROUP_LENGTH,
    PER_INSTANCE_TAGS,
    PREFIX,
    SOP_INSTANCE_UID,
    HeaderKey,
    header_key,
)
from gateway.deid.report import DeidReport, Outcome
from gateway.deid.stream import (
    _PIXEL_TAGS,
    MalformedError,
    _element_end,
    _file_meta_end,
    _write_header_and_pixels,
)
from gateway.deid.uids import is_well_known
from gateway.deid.verify import OutputScanner, scanner_for

if TYPE_CHECKING:
    from gateway.deid.engine import Deidentifier


@dataclass(frozen=True)
class _Action:
    kind: str  # "keep", "remap" or "remove"
    vr: str


@dataclass(frozen=True)
class _Entry:
    prefix: bytes
    #: The file meta's elements after its group length, as the first run
    #: wrote them; the Media Storage SOP Instance UID is made per instance.
    meta: tuple[tuple[int, bytes], ...]
    elements: tuple[tuple[int, bytes], ...]
    actions: dict[int, _Action]
    haystack: bytes
    report: DeidReport
    scanner: OutputScanner

    @property
    def size(self) -> int:
        """Bytes held, about: the header's elements and its lower-case copy."""
        return 2 * len(self.haystack)


class HeaderMemo:
    """The de-identified headers of the last ``capacity`` distinct inputs,
    holding at most ``max_bytes`` of them (a header larger than a quarter of
    that is not kept).

    Thread-safe; one per :class:`~gateway.deid.engine.Deidentifier` (the
    stored output depends on its profile and key).
    """

    def __init__(self, capacity: int = 64, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        #: Instances written from a stored header, and instances probed that
        #: took a full run (no stored header, or one that could not be reused).
        self.hits = 0
        self.misses = 0

    @property
    def held_bytes(self) -> int:
        """About how many bytes the kept headers take."""
        return self._bytes

    def probe(self, src: Path) -> HeaderKey | None:
        """The key of ``src``'s header; ``None`` when it cannot be reused (a
        full run decides what to do with it)."""
        return header_key(src)

    def rewrite(
        self,
        deid: Deidentifier,
        probe: HeaderKey,
        src: Path,
        dst: Path,
        *,
        durable: bool = True,
        pixels_by_reference: bool = False,
    ) -> DeidReport | None:
        """Write ``dst`` from a stored header; ``None`` when there is none for
        this input or it cannot be reused safely (``dst`` is then not written)."""
        with self._lock:
            entry = self._entries.get(probe.key)
            if entry is not None:
                self._entries.move_to_end(probe.key)
        if entry is None:
            self.misses += 1
            return None
        values = _new_values(deid, entry, probe)
        if values is None:
            self.misses += 1
            return None
        header = _assemble(entry, values, probe.syntax)
        reference = _write_header_and_pixels(
            header, src, probe.pixel_extent, dst, durable=durable, by_reference=pixels_by_reference
        )
        self.hits += 1
        report = _copy(entry.report)
        report.pixel_reference = reference
        new_uid = values.get(SOP_INSTANCE_UID)
        old_uid = str(probe.per_instance[SOP_INSTANCE_UID].value)
        report.new_sop_instance_uid = str(new_uid.value) if new_uid is not None else None
        if new_uid is not None and str(new_uid.value) != old_uid:
            report.uid_map[old_uid] = str(new_uid.value)
        return report

    def learn(
        self,
        deid: Deidentifier,
        probe: HeaderKey,
        output: Dataset,
        report: DeidReport,
        dst: Path,
        header_length: int,
    ) -> None:
        """Keep what a full run wrote for ``probe``'s input, if it can be reused."""
        if report.outcome is not Outcome.PASSED or report.output_scanner is None:
            return
        actions = _actions(deid, probe.per_instance, output)
        if actions is None or SOP_INSTANCE_UID not in actions or actions[SOP_INSTANCE_UID].kind == "remove":
            return
        with dst.open("rb") as fh:
            data = fh.read(header_length)
        if len(data) != header_length or data[128:PREFIX] != b"DICM":
            return
        try:
            dataset_start = _file_meta_end(data, PREFIX)
            meta = _split(data[:dataset_start], PREFIX, ExplicitVRLittleEndian)
            elements = _split(data, dataset_start, probe.syntax)
        except (MalformedError, struct.error):
            return
        if not meta or meta[0][0] != META_GROUP_LENGTH:
            return
        if sum(tag == MEDIA_SOP_INSTANCE_UID for tag, _ in meta) != 1:
            return
        if any(tag in _PIXEL_TAGS or tag < 0x00080000 for tag, _ in elements):
            return
        stored = _copy(report)
        # The map of this instance's own UIDs goes; a UID that the rest of the
        # header also holds stays (its replacement is in the stored elements).
        rest = b"".join(chunk for tag, chunk in elements if tag not in PER_INSTANCE_TAGS)
        for elem in probe.per_instance:
            old = str(elem.value)
            new = stored.uid_map.get(old)
            if new is not None and new.encode("ascii") not in rest:
                del stored.uid_map[old]
        entry = _Entry(
            prefix=data[:PREFIX],
            meta=tuple(meta[1:]),
            elements=tuple(elements),
            actions=actions,
            haystack=data.lower(),
            report=stored,
            scanner=report.output_scanner,
        )
        values = {tag: output[tag] for tag, action in actions.items() if action.kind != "remove"}
        if _assemble(entry, values, probe.syntax) != data:
            return
        if entry.size > self.max_bytes // 4:
            return
        with self._lock:
            replaced = self._entries.pop(probe.key, None)
            self._bytes -= replaced.size if replaced is not None else 0
            self._entries[probe.key] = entry
            self._bytes += entry.size
            while len(self._entries) > self.capacity or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size


def _actions(deid: Deidentifier, inputs: Dataset, output: Dataset) -> dict[int, _Action] | None:
    """What the engine did to each per-instance attribute, when it is a
    function of the value alone."""
    actions: dict[int, _Action] = {}
    for elem in inputs:
        tag = int(elem.tag)
        if tag not in output:
            actions[tag] = _Action("remove", elem.VR)
            continue
        out = output[tag]
        if out.VR != elem.VR or out.VM != 1 or elem.VM != 1:
            return None
        if elem.VR == "UI":
            uid = str(elem.value)
            if is_well_known(uid):
                return None
            if str(out.value) == deid.uids.remap(uid):
                actions[tag] = _Action("remap", "UI")
            elif str(out.value) == uid:
                actions[tag] = _Action("keep", "UI")
            else:
                return None
        elif elem.VR in ("IS", "US", "UL") and out.value == elem.value:
            actions[tag] = _Action("keep", elem.VR)
        else:
            return None
    return actions


def _new_values(deid: Deidentifier, entry: _Entry, probe: HeaderKey) -> dict[int, DataElement] | None:
    """The output's per-instance elements for ``probe``, or ``None`` when
    reusing the stored header could let an identifying value through."""
    inputs = probe.per_instance
    if set(entry.actions) != {int(tag) for tag in inputs.keys()}:
        return None
    uid = inputs[SOP_INSTANCE_UID].value
    if probe.media_sop_instance_uid[8:].rstrip(b"\0 ").decode("ascii", "replace") != str(uid):
        return None  # the full run refuses a file meta that names another instance
    carried = harvest(inputs)
    for value in carried.text_values() | carried.uids:
        if value.lower().encode("utf-8", "replace") in entry.haystack:
            return None
    values: dict[int, DataElement] = {}
    for tag, action in entry.actions.items():
        elem = inputs[tag]
        if elem.VM != 1 or action.vr != elem.VR:
            return None
        if action.kind == "remap":
            if is_well_known(str(elem.value)):
                return None
            values[tag] = DataElement(tag, "UI", deid.uids.remap(str(elem.value)))
        elif action.kind == "keep":
            values[tag] = DataElement(tag, elem.VR, elem.value)
    check = Dataset()
    for elem in values.values():
        check.add(elem)
    if entry.scanner.scan(check) or scanner_for(deid.profile, carried).scan(check):
        return None
    return values


def _assemble(entry: _Entry, values: dict[int, DataElement], syntax: UID) -> bytes:
    """The output header: the stored elements, with the per-instance ones and
    the file meta made for this instance."""
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = False
    out.write(entry.prefix)
    media_uid = _ui_element(MEDIA_SOP_INSTANCE_UID, str(values[SOP_INSTANCE_UID].value))
    meta = b"".join(media_uid if tag == MEDIA_SOP_INSTANCE_UID else chunk for tag, chunk in entry.meta)
    out.write(_GROUP_LENGTH.pack(0x0002, 0x0000, b"UL", 4, len(meta)))
    out.write(meta)
    out.is_implicit_VR = syntax.is_implicit_VR
    pending = sorted(values.items())
    for tag, chunk in entry.elements:
        while pending and pending[0][0] < tag:
            write_data_element(out, pending.pop(0)[1])
        if pending and pending[0][0] == tag:
            write_data_element(out, pending.pop(0)[1])
        else:
            out.write(chunk)
    for _, elem in pending:
        write_data_element(out, elem)
    return bytes(out.getvalue())


#: File meta group length: tag, VR, value length, value (explicit VR little endian).
_GROUP_LENGTH = struct.Struct("<HH2sHL")
_SHORT_ELEMENT = struct.Struct("<HH2sH")


def _ui_element(tag: int, uid: str) -> bytes:
    """A UI element of the file meta, padded to even length with a NUL as
    pydicom pads it."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return _SHORT_ELEMENT.pack(tag >> 16, tag & 0xFFFF, b"UI", len(value)) + value


def _copy(report: DeidReport) -> DeidReport:
    """A report of its own for another instance (the containers are not shared)."""
    return dataclasses.replace(
        report,
        action_counts=Counter(report.action_counts),
        uid_map=dict(report.uid_map),
        patient_map=dict(report.patient_map),
        unaddressed=list(report.unaddressed),
        findings=[],
        explain=[],
        output_scanner=None,
        pixel_reference=None,
    )


def _split(data: bytes, start: int, syntax: UID) -> list[tuple[int, bytes]]:
    """The top-level elements of the data set in ``data[start:]``, as (tag, bytes)."""
    elements = []
    offset = start
    while offset < len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        end = _element_end(data, offset, syntax.is_implicit_VR, True)
        elements.append(((group << 16) | element, data[offset:end]))
        offset = end
    return elements


__all__ = ["HeaderMemo"]

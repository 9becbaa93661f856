"""Cut-through forwarding: a large instance sent on while it still arrives.

Store and forward makes a whole-slide image wait twice: the archive gets its
first byte only once the last one is durable in the spool, so the relay takes
the receipt plus the archive's own time. Here, once a data set arriving at
the receiver grows past ``forwarding.cut_through_bytes``, the main process:

1. waits for its header (everything before the top-level pixel data element)
   and de-identifies it with the route's engine, the pixel data stood in for
   by an empty element of the same tag and VR. Nothing is sent unless the
   engine passes the instance with its pixel data unchanged (by reference,
   as it passes every VOLUME image);
2. opens a C-STORE on every DICOM destination of the route whose association
   is free, sends the de-identified header, then the pixel data as it
   arrives: only bytes known to lie inside the pixel data element (item by
   item for encapsulated pixel data), never its last byte;
3. once the receiver has admitted the instance (durable in the spool, the
   sender answered Success), processes the entry as any other
   (:class:`~gateway.forward.Forwarder`): the full run of the engine on the
   spooled file, mappings, audit. A destination with an open request gets
   the rest of the instance and its last PDU only if that run wrote the same
   header, byte for byte, with the pixel data at the same place of the same
   file. The input is hashed for its audit record after the delivery, as
   every input is.

It is off by default (``cut_through_bytes: 0``): where the sender, the
gateway and the archive share a few cores, the work it moves into the
receipt slows the sender's acknowledgement by more than it gains the archive
(see ``docs/performance.md``). It pays where the archive is on another host
or cores are to spare.

Anything else (the receipt refused or cut short, another header or outcome,
an error, the gateway stopping) leaves the request unfinished and aborts its
association, so the archive stores nothing, and the entry, if there is one,
takes the normal path. What an archive may have seen of an instance it was
then not given is its de-identified header and part of pixel data that the
profile passes unchanged.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from structlog.typing import FilteringBoundLogger

from gateway import metrics
from gateway.deid.report import Outcome
from gateway.deid.stream import _LONG_VRS, _PIXEL_TAGS, _UNDEFINED, MalformedError, _element_end
from gateway.dimse import read_file_meta
from gateway.logs import get_logger
from gateway.priority import CUT_THROUGH_NICE, lower_thread_priority
from gateway.spool import EntryInfo
from gateway.store_scu import Segment, StoreRequestWriter, StoreSource

if TYPE_CHECKING:
    from gateway.forward import DicomLink, Forwarder

#: Data sets forwarded while they arrive, at most, at once; more take the normal path.
MAX_ARRIVALS = 2
#: The header must lie within this many bytes of the file's start.
MAX_HEADER_BYTES = 64 * 2**20
#: The first read of the header; each next one is four times larger.
HEADER_STEP = 2**20
#: How long a data set may arrive without growing before it is given up
#: (longer than the receiver's network timeout, after which it ends anyway).
STALL_SECONDS = 150.0
#: How often the arriving file is looked at.
POLL_SECONDS = 0.002
#: Bytes of pixel data sent in one step, at least.
STEP = 4 * 2**20
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)


def _log() -> FilteringBoundLogger:
    """A logger built per call, so it follows the configuration made at start-up."""
    return get_logger(logger=__name__)


@dataclass(frozen=True, slots=True)
class PixelElement:
    """Where the top-level pixel data element of an arriving file starts, and
    how it is encoded."""

    start: int
    syntax: UID
    #: The element's header (tag, VR, length) as in the file.
    header: bytes
    #: Its value's length, or None when undefined (encapsulated).
    length: int | None

    def stand_in(self) -> bytes:
        """An empty element of the same tag and VR."""
        little = self.syntax.is_little_endian
        endian = "<" if little else ">"
        if self.length is not None:
            return self.header[:-4] + struct.pack(endian + "L", 0)
        item = struct.pack(endian + "HHL", *_ITEM, 0)
        return self.header + item + struct.pack(endian + "HHL", *_SEQUENCE_DELIMITER, 0)


def locate_pixels(data: bytes) -> PixelElement | None:
    """The top-level pixel data element of a Part 10 file that begins with
    ``data``; None when ``data`` does not reach it yet (or the file cannot be
    read this way: no file meta, a deflated data set, a header that does not
    parse)."""
    with contextlib.suppress(ValueError):
        meta = read_file_meta(io.BytesIO(data))
        if meta is None:
            return None
        syntax = UID(meta[2])
        if not syntax.is_transfer_syntax or syntax == DeflatedExplicitVRLittleEndian:
            return None
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
        endian = "<" if little else ">"
        offset = meta[3]
        while len(data) - offset >= 12:
            group, element = struct.unpack_from(endian + "HH", data, offset)
            if (group << 16) | element in _PIXEL_TAGS:
                if implicit:
                    header = data[offset : offset + 8]
                elif data[offset + 4 : offset + 6] in _LONG_VRS:
                    header = data[offset : offset + 12]
                else:
                    return None
                (length,) = struct.unpack_from(endian + "L", header, len(header) - 4)
                return PixelElement(offset, syntax, header, None if length == _UNDEFINED else length)
            offset = _element_end(data, offset, implicit, little)
    return None


class PixelScan:
    """How far an arriving file's bytes are known to lie inside its pixel
    data element: the value's end for a defined length, else the end of the
    last item whose header has arrived, until the sequence delimiter."""

    def __init__(self, fd: int, element: PixelElement) -> None:
        self._fd = fd
        self._endian = "<" if element.syntax.is_little_endian else ">"
        value = element.start + len(element.header)
        #: Where the element ends, once known.
        self.end: int | None = None if element.length is None else value + element.length
        self._next = value

    def inside(self, size: int) -> int:
        """The offset before which every byte belongs to the element, with
        ``size`` bytes of the file arrived. Raises MalformedError on a broken item."""
        if self.end is not None:
            return self.end
        while self._next + 8 <= size:
            head = os.pread(self._fd, 8, self._next)
            if len(head) < 8:
                break
            group, element, length = struct.unpack(self._endian + "HHL", head)
            if (group, element) == _SEQUENCE_DELIMITER:
                self.end = self._next + 8
                return self.end
            if (group, element) != _ITEM or length == _UNDEFINED:
                raise MalformedError("malformed item in encapsulated pixel data")
            self._next += 8 + length
        return self._next


@dataclass
class _Stream:
    """An open C-STORE to one destination; its link's lock is held."""

    name: str
    link: DicomLink
    writer: StoreRequestWriter


class Arrival:
    """One data set forwarded while it arrives (see the module)."""

    def __init__(self, owner: CutThrough, path: str, info: EntryInfo) -> None:
        self._owner = owner
        self.path = Path(path)
        self.info = info
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._entry_id: str | None = None
        self._given_up = False
        self._streams: dict[str, _Stream] = {}
        self._fd = -1
        self._element: PixelElement | None = None
        #: The de-identified header sent, and the file it was sent from.
        self._head = b""
        self._header_segment: Segment | None = None
        self._files: list[Path] = []
        #: Input offset up to which the instance was sent.
        self._sent = 0
        #: Pixel data bytes sent while the instance arrived.
        self._sent_ahead = 0

    @property
    def destinations(self) -> frozenset[str]:
        """The destinations with an open request."""
        return frozenset(self._streams)

    def ended(self, entry_id: str | None) -> None:
        """The receipt ended: admitted as ``entry_id``, or not. An admitted
        entry is claimed from the forwarder's workers, unless this arrival
        was given up already."""
        with self._lock:
            if not self._given_up and entry_id is not None:
                self._owner.forwarder.scheduler.claim(entry_id)
                self._entry_id = entry_id
        self._ended.set()

    def run(self) -> None:
        lower_thread_priority(CUT_THROUGH_NICE)
        try:
            entry_id = self._arrive()
        except Exception as exc:
            _log().error("cut-through.failed", error_type=type(exc).__name__)
            entry_id = None
        try:
            if entry_id is None:
                self._give_up()
                return
            self._owner.forwarder.process_arrival(entry_id, self)
        finally:
            self._close()

    def finish(self, name: str, output: StoreSource) -> int | None:
        """Complete the request open to ``name`` with the entry's de-identified
        ``output``: its status, or None when none is open or ``output`` is not
        what was sent (the request is then abandoned, and the instance must be
        sent whole). Raises as :meth:`~gateway.forward.DicomLink.send`."""
        stream = self._streams.pop(name, None)
        if stream is None:
            return None
        try:
            reference = output.pixels
            element = self._element
            same = (
                reference is not None
                and element is not None
                and reference.start == element.start
                and reference.end > self._sent
                and os.path.samestat(reference.source.stat(), os.fstat(self._fd))
                and _head(output.path, reference.at) == self._head
            )
            if not same or reference is None:
                self._abandon(stream, "output-differs")
                return None
            rest = [Segment(reference.source, self._sent, reference.end - self._sent)]
            trailer = output.path.stat().st_size - reference.at
            if trailer:
                rest.append(Segment(output.path, reference.at, trailer))
            code = stream.link.finish_stream(stream.writer, rest)
            metrics.record_cut_through("forwarded")
            _log().info(
                "cut-through.forwarded",
                assoc_id=self.info.assoc_id,
                destination=name,
                size_bytes=self._sent_ahead,
            )
            return code
        finally:
            stream.link.lock.release()

    # ------------------------------------------------------------ stages
    def _arrive(self) -> str | None:
        """Forward while the data set arrives; the admitted entry's id, or
        None when the instance takes the normal path."""
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            self._declined("gone")
            return None
        element = self._wait_for_header()
        if element is None:
            self._declined("header-unreadable")
            return None
        self._element = element
        meta = self._deidentify_header(element)
        if meta is None:
            self._declined("not-passed-unchanged")
            return None
        self._sent = element.start
        self._open_streams(meta)
        if not self._streams:
            self._declined("destinations-busy")
            return None
        for name in self._streams:
            _log().info("cut-through.started", assoc_id=self.info.assoc_id, destination=name)
        self._pump(PixelScan(self._fd, element))
        self._sent_ahead = self._sent - element.start
        if self._entry_id is None or self.stopping:
            self._abandon_all("not-admitted")
            return None
        return self._entry_id

    @property
    def stopping(self) -> bool:
        return self._owner.stopping

    def _wait_for_header(self) -> PixelElement | None:
        """The pixel data element, once the header before it has arrived;
        read in growing steps, since most headers are far smaller than the
        file is when it is announced."""
        step = HEADER_STEP
        while True:
            size = os.fstat(self._fd).st_size
            data = os.pread(self._fd, min(size, step), 0)
            element = locate_pixels(data)
            if element is not None:
                return element
            if len(data) == step and step < MAX_HEADER_BYTES:
                step *= 4
                continue
            if size >= MAX_HEADER_BYTES or not self._wait_for_growth(size):
                return None

    def _wait_for_growth(self, size: int) -> bool:
        """Wait until the file is larger than ``size``; False when its receipt
        ended, the gateway is stopping, or it stalled."""
        deadline = time.monotonic() + STALL_SECONDS
        while os.fstat(self._fd).st_size <= size:
            if self._ended.is_set() or self._owner.stopping or time.monotonic() > deadline:
                return False
            self._ended.wait(POLL_SECONDS)
        return True

    def _deidentify_header(self, element: PixelElement) -> tuple[str, str, str, int] | None:
        """Run the route's engine on the header with a stand-in pixel data
        element; the File Meta of the de-identified header, or None unless
        it passed with its pixel data by reference."""
        forwarder = self._owner.forwarder
        engine = forwarder.engines.get(self.info.route)
        if engine is None:
            return None
        name = uuid.uuid4().hex
        standin = forwarder.spool.work / f"cut-{name}.in.dcm"
        output = forwarder.spool.work / f"cut-{name}.out.dcm"
        self._files += [standin, output]
        standin.write_bytes(os.pread(self._fd, element.start, 0) + element.stand_in())
        report = engine.deidentify_file(standin, output, durable=False, pixels_by_reference=True)
        reference = report.pixel_reference
        if report.outcome is not Outcome.PASSED or reference is None or reference.start != element.start:
            return None
        if output.stat().st_size != reference.at:  # elements after the stand-in: not expected
            return None
        self._head = _head(output, reference.at)
        with output.open("rb") as fp:
            meta = read_file_meta(fp)
        if meta is None:
            return None
        self._header_segment = Segment(output, meta[3], reference.at - meta[3])
        return meta

    def _open_streams(self, meta: tuple[str, str, str, int]) -> None:
        forwarder = self._owner.forwarder
        route = forwarder.route(self.info.route)
        if route is None or self._header_segment is None:
            return
        for name in route.destinations:
            link = forwarder.link(name)
            if link is None or not link.lock.acquire(blocking=False):
                continue
            writer = None
            try:
                writer = link.begin(meta)
                if writer is not None:
                    writer.write([self._header_segment])
            except Exception:
                link.abort()
                writer = None
            if writer is None:
                link.lock.release()
                continue
            self._streams[name] = _Stream(name, link, writer)

    def _pump(self, scan: PixelScan) -> None:
        """Send the pixel data known to be inside its element as it arrives,
        until the receipt ends (the rest is sent by :meth:`finish`)."""
        deadline = time.monotonic() + STALL_SECONDS
        while self._streams and not self.stopping and not self._ended.is_set():
            size = os.fstat(self._fd).st_size
            inside = scan.inside(size)
            # Never the element's last byte: the last PDU is the full run's to send.
            limit = min(size, inside if scan.end is None else scan.end - 1)
            if limit - self._sent < STEP:
                if time.monotonic() > deadline:
                    return
                self._ended.wait(POLL_SECONDS)
                continue
            # Fragments of even length: dcmtk, for one, refuses odd ones.
            count = (limit - self._sent) & ~1
            for stream in list(self._streams.values()):
                try:
                    stream.writer.write([Segment(self.path, self._sent, count)])
                except Exception:
                    self._streams.pop(stream.name)
                    try:
                        self._abandon(stream, "connection-lost")
                    finally:
                        stream.link.lock.release()
            self._sent += count
            deadline = time.monotonic() + STALL_SECONDS

    # ------------------------------------------------------------ endings
    def _declined(self, reason: str) -> None:
        metrics.record_cut_through("declined")
        _log().info("cut-through.declined", assoc_id=self.info.assoc_id, reason=reason)

    def _abandon(self, stream: _Stream, reason: str) -> None:
        """Leave ``stream``'s request unfinished and abort its association
        (its lock stays with the caller)."""
        stream.writer.abandon()
        stream.link.abort()
        metrics.record_cut_through("abandoned")
        _log().warning(
            "cut-through.abandoned", assoc_id=self.info.assoc_id, destination=stream.name, reason=reason
        )

    def _abandon_all(self, reason: str) -> None:
        for name in list(self._streams):
            stream = self._streams.pop(name)
            try:
                self._abandon(stream, reason)
            finally:
                stream.link.lock.release()

    def _give_up(self) -> None:
        """The instance takes the normal path: hand a claimed entry back."""
        self._abandon_all("given-up")
        with self._lock:
            self._given_up = True
            entry_id = self._entry_id
        if entry_id is not None:
            self._owner.forwarder.scheduler.retry(entry_id, 0.0)

    def _close(self) -> None:
        self._abandon_all("not-completed")
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for path in self._files:
            path.unlink(missing_ok=True)
        self._owner.done(self)


def _head(path: Path, count: int) -> bytes:
    with path.open("rb") as fp:
        return fp.read(count)


class CutThrough:
    """The data sets forwarded while they arrive (see the module); the
    receiver's reports (:class:`~gateway.receive_process.Arrivals`) land here."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self._lock = threading.Lock()
        self._arrivals: dict[str, Arrival] = {}
        self._threads: dict[Arrival, threading.Thread] = {}
        self._stopping = threading.Event()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def arriving(self, path: str, info: EntryInfo) -> None:
        with self._lock:
            if self.stopping or len(self._arrivals) >= MAX_ARRIVALS or path in self._arrivals:
                metrics.record_cut_through("declined")
                return
            arrival = Arrival(self, path, info)
            thread = threading.Thread(target=arrival.run, name="cut-through", daemon=True)
            self._arrivals[path] = arrival
            self._threads[arrival] = thread
        thread.start()

    def ended(self, path: str, entry_id: str | None) -> None:
        with self._lock:
            arrival = self._arrivals.get(path)
        if arrival is not None:
            arrival.ended(entry_id)

    def receiver_ended(self) -> None:
        with self._lock:
            arrivals = list(self._arrivals.values())
        for arrival in arrivals:
            arrival.ended(None)

    def done(self, arrival: Arrival) -> None:
        with self._lock:
            self._arrivals.pop(str(arrival.path), None)
            self._threads.pop(arrival, None)

    def stop(self, timeout: float = 30.0) -> None:
        """Abandon what is still arriving; let an admitted entry's delivery finish."""
        self._stopping.set()
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

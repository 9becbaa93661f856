"""C-STORE requests sent from file without pynetdicom's queues and DIMSE layer.

pynetdicom's ``send_c_store`` reads the file's meta with pydicom, builds the
request as a pydicom data set and encodes it, and queues every P-DATA PDU to
its DUL thread; the response comes back as PDU objects, a primitive and a
command set decoded by pydicom, handed from the DUL thread through a queue.
For a whole-slide image that is thousands of hand-offs between two threads,
and for a study of small instances about a third of the forwarding process's
CPU.

:class:`DirectPData` lets the sending thread write an association's P-DATA
PDUs itself. :func:`send_store` then sends a whole C-STORE from file: it
reads the File Meta Information by hand, writes the command set
(:mod:`gateway.dimse`) and the data set in P-DATA PDUs of the archive's
maximum length, and :class:`ResponseReader`, in the association's DUL
thread, puts the response's status on the queue where pynetdicom would put
the decoded response. The wait is pynetdicom's own: the association's reactor
paused, the DIMSE timeout, an abort ends it.

:func:`send_store` gives up before anything is sent (None: the caller sends
with pynetdicom) when the file's meta cannot be read by hand, no accepted
presentation context has the file's SOP class and transfer syntax, handlers
are bound to PDU, data or DIMSE events, or P-DATA cannot be written directly
(TLS, PDUs still queued). A response that is not one whole command item on
the request's context with its message ID, or that arrives while pynetdicom
has something in hand, is left to pynetdicom, whose decoded response then
answers.
"""

from __future__ import annotations

import contextlib
import io
import socket
import ssl
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from gateway.deid.report import PixelReference
from gateway.deid.stream import fill_pixels
from gateway.dimse import command_pdu, decode_store_response, encode_store_request, read_file_meta
from gateway.pdu import (
    COMMAND,
    ESTABLISHED,
    LAST,
    P_DATA_TF_TYPE,
    PDU_HEADER,
    PDV_HEADER,
    WATCHING_EVENTS,
    nothing_pending,
    pdv_items,
)

#: A presentation data value item's header as written: length, context ID.
_PDV_HEADER = struct.Struct(">LB")


class DirectPData:
    """Writes the association's P-DATA PDUs from the sending thread itself.

    pynetdicom queues every P-DATA primitive to its DUL thread, which turns
    it into a PDU object, runs the state machine (in Sta6 a P-DATA request
    leads back to Sta6) and copies it once more onto the socket: for a
    whole-slide image sent to an archive that takes 128 KiB PDUs, thousands
    of hand-offs between two threads per instance. Here a P-DATA primitive
    is encoded and written by the thread that sends the C-STORE, in order,
    and the socket's own blocking is the back-pressure.

    Only while nothing else can be on the wire in between: the association
    established (Sta6), every P-DATA queued earlier already written by the
    DUL thread, no TLS (an SSL connection must not be used by two threads at
    once), no handler bound to PDU events. Otherwise the primitive takes
    pynetdicom's queue. PDUs the DUL thread writes (an A-ABORT, a release)
    take the same lock, so two PDUs never interleave on the wire.
    """

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._dul = assoc.dul
        self._lock = threading.Lock()
        self._queued = 0
        self._written = 0
        self._queue_pdu = self._dul.send_pdu
        self._write_pdu = self._dul._send
        self._dul.send_pdu = self.send_pdu
        self._dul._send = self._locked_send
        #: P-DATA PDUs written from the sending thread (for tests and the curious).
        self.direct = 0

    def _locked_send(self, pdu: Any) -> None:
        """The DUL thread's write of a PDU, under the lock."""
        with self._lock:
            self._write_pdu(pdu)
            if isinstance(pdu, P_DATA_TF):
                self._written += 1

    def _can_write(self) -> bool:
        dul = self._dul
        transport = dul.socket
        return (
            dul.state_machine.current_state == ESTABLISHED
            and self._queued == self._written
            and transport is not None
            and transport.socket is not None
            and not isinstance(transport.socket, ssl.SSLSocket)
            and not self._assoc.get_handlers(evt.EVT_PDU_SENT)
            and not self._assoc.get_handlers(evt.EVT_DATA_SENT)
        )

    def send_pdu(self, primitive: Any) -> None:
        """``DULServiceProvider.send_pdu`` for this association (see the class)."""
        if not isinstance(primitive, P_DATA):
            self._queue_pdu(primitive)
            return
        with self._lock:
            if not self._can_write():
                self._queued += 1
                direct = False
            else:
                pieces: list[bytes] = [b""]
                for context_id, data in primitive.presentation_data_value_list:
                    pieces.append(_PDV_HEADER.pack(len(data) + 1, context_id))
                    pieces.append(data)
                length = sum(len(piece) for piece in pieces)
                pieces[0] = PDU_HEADER.pack(P_DATA_TF_TYPE, 0, length)
                # Raises OSError when the connection is gone: the C-STORE fails.
                self._dul.socket.socket.sendall(b"".join(pieces))
                self.direct += 1
                direct = True
        if not direct:
            self._queue_pdu(primitive)

    def write_from_files(self, header: bytes, pieces: list[tuple[io.BufferedReader, int, int]]) -> bool:
        """Write a P-DATA-TF PDU: its ``header`` (PDU and item headers), then
        its data from the files, each ``(file, offset, length)`` copied to the
        socket by the kernel (``sendfile``); as :meth:`write`."""
        with self._lock:
            if not self._can_write():
                return False
            sock = self._dul.socket.socket
            sock.sendall(header, _MSG_MORE)
            for file, offset, length in pieces:
                if sock.sendfile(file, offset, length) != length:
                    raise OSError("a file ended before the data set did")
            self.direct += 1
            return True

    def write(self, pdu: bytes | bytearray | memoryview) -> bool:
        """Write a whole encoded P-DATA-TF PDU now, if nothing else can be on
        the wire (see the class); False when it cannot be written here.
        Raises OSError when the connection is gone."""
        with self._lock:
            if not self._can_write():
                return False
            self._dul.socket.socket.sendall(pdu)
            self.direct += 1
            return True


#: Tells the kernel that the PDU's data follows its header (Linux).
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
#: The largest data set fragment written (the archive's maximum PDU may be larger or unlimited).
MAX_FRAGMENT = 4 * 1024 * 1024


class DirectResponse:
    """A C-STORE response's status, as :class:`ResponseReader` queues it."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


class ResponseReader:
    """Reads, in an association's DUL thread, the C-STORE response that
    :func:`send_store` waits for (see the module)."""

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._lock = threading.Lock()
        self._expected: tuple[int, int] | None = None
        #: Responses read here (for tests and the curious).
        self.read = 0

    def expect(self, context_id: int, message_id: int) -> None:
        with self._lock:
            self._expected = (context_id, message_id)

    def forget(self) -> None:
        with self._lock:
            self._expected = None

    def take(self, dul: Any, pdu: bytearray) -> bool:
        """The response PDU, if ``pdu`` is it; anything else is pynetdicom's."""
        with self._lock:
            expected, self._expected = self._expected, None
        if expected is None:
            return False
        context_id, message_id = expected
        items = pdv_items(pdu)
        if items is None or len(items) != 1:
            return False
        item = items[0]
        if item.context_id != context_id or item.control & (COMMAND | LAST) != COMMAND | LAST:
            return False
        dimse = self._assoc.dimse
        if not nothing_pending(dul) or dimse.message is not None:
            return False
        status = decode_store_response(bytes(pdu[item.start : item.stop]), message_id)
        if status is None:
            return False
        dimse.msg_queue.put((context_id, DirectResponse(status)))
        self.read += 1
        return True


def _context_id(assoc: Any, sop_class_uid: str, transfer_syntax: str) -> int | None:
    for context in assoc.accepted_contexts:
        if (
            context.abstract_syntax == sop_class_uid
            and context.transfer_syntax
            and context.transfer_syntax[0] == transfer_syntax
            and context.as_scu
        ):
            return int(context.context_id)
    return None


@dataclass(frozen=True, slots=True)
class Segment:
    """``length`` bytes of the file ``path`` from ``offset``."""

    path: Path
    offset: int
    length: int


class StoreSource:
    """What a C-STORE sends: a Part 10 file, or one the engine wrote with its
    pixel data by reference (``pixels``: the pixel data still in the input),
    which :meth:`whole` fills in when a whole file is needed."""

    def __init__(self, path: Path, pixels: PixelReference | None = None) -> None:
        self.path = path
        self.pixels = pixels

    @property
    def size(self) -> int:
        """The instance's size in bytes."""
        pixels = self.pixels
        extra = pixels.end - pixels.start if pixels is not None else 0
        return self.path.stat().st_size + extra

    def segments(self) -> list[Segment]:
        """The instance's bytes, in order."""
        pixels = self.pixels
        if pixels is None:
            return [Segment(self.path, 0, self.path.stat().st_size)]
        rest = self.path.stat().st_size - pixels.at
        parts = [
            Segment(self.path, 0, pixels.at),
            Segment(pixels.source, pixels.start, pixels.end - pixels.start),
            Segment(self.path, pixels.at, rest),
        ]
        return [part for part in parts if part.length]

    def whole(self) -> Path:
        """The file, with its pixel data in place (filled in once)."""
        if self.pixels is not None:
            fill_pixels(self.path, self.pixels)
            self.pixels = None
        return self.path


def send_store(
    assoc: Any,
    pdata: DirectPData,
    reader: ResponseReader,
    source: StoreSource,
    message_id: int,
) -> Dataset | None:
    """C-STORE ``source`` (see the module); the status as pynetdicom's
    ``send_c_store`` returns it (empty when no response came), or None when it
    must be sent with pynetdicom, nothing having been sent. Raises OSError
    when the connection fails while the request is written.
    """
    with source.path.open("rb") as fp:
        meta = read_file_meta(fp)
    if meta is None:
        return None
    data_set = _skip(source.segments(), meta[3])
    if not data_set:
        return None
    request = StoreRequestWriter.open(assoc, pdata, reader, meta, message_id)
    if request is None:
        return None
    return request.finish(data_set)


class StoreRequestWriter:
    """One C-STORE request written in parts: the command at once, then the
    data set as its bytes become available (:meth:`write`), and the last
    fragment when the caller allows (:meth:`finish`), or never
    (:meth:`abandon`). Its files stay open until it ends, so a file renamed
    meanwhile is still read.

    From :meth:`open` to its end the association's reactor is paused, as
    pynetdicom pauses it for a whole C-STORE."""

    def __init__(self, assoc: Any, pdata: DirectPData, reader: ResponseReader, context_id: int) -> None:
        self._assoc = assoc
        self._pdata = pdata
        self._reader = reader
        self._context_id = context_id
        self._files = contextlib.ExitStack()
        self._open_files: dict[Path, io.BufferedReader] = {}
        self._ended = False

    @classmethod
    def open(
        cls,
        assoc: Any,
        pdata: DirectPData,
        reader: ResponseReader,
        meta: tuple[str, str, str, int],
        message_id: int,
    ) -> StoreRequestWriter | None:
        """Write the command of a C-STORE of the instance whose File Meta
        Information is ``meta`` (:func:`~gateway.dimse.read_file_meta`); None,
        nothing sent, when it must be sent with pynetdicom (see the module)."""
        if not assoc.is_established or any(assoc.get_handlers(event) for event in WATCHING_EVENTS):
            return None
        sop_class_uid, sop_instance_uid, transfer_syntax, _ = meta
        context_id = _context_id(assoc, sop_class_uid, transfer_syntax)
        if context_id is None:
            return None
        command = command_pdu(context_id, encode_store_request(message_id, sop_class_uid, sop_instance_uid))
        # As pynetdicom does: pause the association's reactor, so that it
        # cannot take the response off the queue first.
        assoc._reactor_checkpoint.clear()
        try:
            while not assoc._is_paused:
                time.sleep(0.0001)
            reader.expect(context_id, message_id)
            if not pdata.write(command):
                reader.forget()
                assoc._reactor_checkpoint.set()
                return None
        except BaseException:
            reader.forget()
            assoc._reactor_checkpoint.set()
            raise
        return cls(assoc, pdata, reader, context_id)

    def write(self, segments: list[Segment]) -> None:
        """Write the bytes of ``segments`` (an even count) as data set
        fragments that are not the last. Raises OSError when the connection fails."""
        try:
            self._write(segments, last=False)
        except BaseException:
            self.abandon()
            raise

    def finish(self, segments: list[Segment]) -> Dataset:
        """Write the rest of the data set, ``segments`` (not empty), and wait
        for the response."""
        try:
            self._write(segments, last=True)
            _, response = self._assoc.dimse.get_msg(block=True)
        except BaseException:
            self.abandon()
            raise
        self._end()
        if response is None:
            self._assoc._handle_no_response()
            return Dataset()
        if isinstance(response, DirectResponse):
            status = Dataset()
            status.Status = response.status
            return status
        checked: Dataset = self._assoc._check_received_status(response)
        return checked

    def abandon(self) -> None:
        """Leave the request unfinished; the caller aborts the association,
        so that the archive stores nothing."""
        if not self._ended:
            self._reader.forget()
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._files.close()
        self._assoc._reactor_checkpoint.set()

    def _file(self, path: Path) -> io.BufferedReader:
        file = self._open_files.get(path)
        if file is None:
            file = self._open_files[path] = self._files.enter_context(path.open("rb"))
        return file

    def _write(self, segments: list[Segment], *, last: bool) -> None:
        """Write the bytes of ``segments`` as data set fragments, one per PDU,
        copied from the files to the socket by the kernel; with ``last`` the
        last of them ends the data set."""
        if self._ended:
            raise ConnectionError("the request has ended")
        peer_maximum = int(self._assoc.acceptor.maximum_length or 0)
        fragment = min(peer_maximum - PDV_HEADER.size, MAX_FRAGMENT) if peer_maximum else MAX_FRAGMENT
        # Of even length, as a data set's elements are: dcmtk, for one,
        # refuses an odd fragment.
        fragment &= ~1
        remaining = sum(segment.length for segment in segments)
        if remaining % 2 or (last and not remaining):
            raise ValueError("data set fragments must be of even length and the last one not empty")
        left = deque(segments)
        while remaining:
            count = min(fragment, remaining)
            remaining -= count
            pieces = []
            while count:
                segment = left.popleft()
                take = min(count, segment.length)
                pieces.append((self._file(segment.path), segment.offset, take))
                if take < segment.length:
                    left.appendleft(Segment(segment.path, segment.offset + take, segment.length - take))
                count -= take
            length = sum(piece[2] for piece in pieces)
            ends = last and not remaining
            header = PDU_HEADER.pack(P_DATA_TF_TYPE, 0, length + PDV_HEADER.size) + PDV_HEADER.pack(
                length + 2, self._context_id, LAST if ends else 0
            )
            if not self._pdata.write_from_files(header, pieces):
                raise ConnectionError("the association ended while the data set was written")


def _skip(segments: list[Segment], count: int) -> list[Segment]:
    """``segments`` without their first ``count`` bytes."""
    rest = []
    for segment in segments:
        if count >= segment.length:
            count -= segment.length
            continue
        rest.append(Segment(segment.path, segment.offset + count, segment.length - count))
        count = 0
    return rest

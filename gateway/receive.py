"""The network edge: association policy, C-ECHO and C-STORE into the spool.

pynetdicom is run with ``STORE_RECV_CHUNKED_DATASET``: it streams each C-STORE
data set into a Part-10 file (128-byte preamble, ``DICM``, File Meta built from
the command set and the accepted transfer syntax, then the data set exactly as
received) and hands the C-STORE handler its path; :mod:`gateway.store_scp`
writes the same file for the requests it serves itself, in the thread that
reads them. The handler moves that file into the spool and answers Success
only once the entry is durable; the clean-up afterwards finds nothing left to
delete.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import shutil
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.filereader import read_partial
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket
from structlog.typing import FilteringBoundLogger

from gateway import metrics, wakeups
from gateway.config import Config
from gateway.deid.headerkey import CheckedHeaders, HeaderKey, header_key
from gateway.logs import get_logger
from gateway.pdu import COMMAND, LAST, P_DATA_TF_TYPE, PDU_HEADER, nothing_pending, pdata_reader, pdv_items
from gateway.received_file import ReceivedFile
from gateway.spool import INSTANCE, EntryInfo, Spool, SpoolFullError
from gateway.store_scp import StoreAnswer, StoreRequest, direct_stores, serve_stores


def _log() -> FilteringBoundLogger:
    """A logger built per call, so it follows the configuration made at start-up."""
    return get_logger(logger=__name__)

STATUS_SUCCESS = 0x0000
#: Refused, Out of Resources: the spool is full or below its free-space floor.
STATUS_OUT_OF_RESOURCES = 0xA700
#: Refused, Out of Resources: the instance is larger than ``limits.max_instance_bytes``.
STATUS_TOO_LARGE = 0xA701
#: Refused, Not Authorized (PS3.7 C.5): no route for this caller and SOP class.
STATUS_NOT_AUTHORIZED = 0x0124
#: Error, Cannot Understand: the handler failed for a reason other than space.
STATUS_CANNOT_PROCESS = 0xC211
#: Error, Cannot Understand: the data set cannot be parsed (wrong lengths,
#: broken items or sequences, truncated pixel data, not DICOM at all).
STATUS_MALFORMED = 0xC210
#: Error, Data Set Does Not Match SOP Class: the data set's SOP Class or
#: Instance UID contradicts the request's Affected SOP Class or Instance UID.
STATUS_DATA_SET_MISMATCH = 0xA900


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings of every gateway process.

    Data sets are sent from file, pynetdicom logging of identifiers is
    switched off (they are UIDs from the data), sockets are read in large
    steps and each PDU is copied once (:func:`_recv`, :func:`_read_pdu_data`),
    a socket is closed even when its peer dropped it (:func:`_shutdown_socket`)
    and the reactor threads wait for events instead of
    polling (:mod:`gateway.wakeups`).
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # pynetdicom's "standard" handlers format a debug line for every PDU and
    # message, at a cost even when nothing is logged.
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    setattr(AssociationSocket, "recv", _recv)  # noqa: B010 - replaces a method of pynetdicom
    setattr(DULServiceProvider, "_read_pdu_data", _read_pdu_data)  # noqa: B010 - as above
    setattr(AssociationSocket, "_shutdown_socket", _shutdown_socket)  # noqa: B010 - as above
    wakeups.install()


def configure_receiving(incoming: Path) -> None:
    """pynetdicom settings of the receiving process.

    Received data sets are written to ``incoming`` (inside the spool) so that
    admitting them is a rename on one file system, and leftovers of aborted
    associations are found and removed at the next start.
    """
    configure_pynetdicom()
    _config.STORE_RECV_CHUNKED_DATASET = True
    setattr(  # noqa: B010 - replaces a module attribute of pynetdicom
        dimse_messages,
        "NamedTemporaryFile",
        partial(ReceivedFile, incoming),
    )


#: Largest single read from an association socket.
RECV_CHUNK = 1 << 20


def _shutdown_socket(self: AssociationSocket) -> None:
    """``AssociationSocket._shutdown_socket`` that closes the socket whatever.

    pynetdicom closes the socket only when ``shutdown`` succeeded first; on a
    connection the peer already dropped, ``shutdown`` fails and the
    descriptor stays open until the socket object is garbage collected.
    """
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` without pynetdicom's 4 KiB steps.

    pynetdicom reads a PDU 4096 bytes at a time and appends each piece to a
    growing bytearray; for a 4 MiB PDU that is a thousand calls and copies.
    This reads into one buffer, up to :data:`RECV_CHUNK` per call (see
    :func:`_read_into`). As in pynetdicom, a closed connection returns what
    was read so far.
    """
    buffer = bytearray(min(nr_bytes, PDU_ALLOCATION_STEP))
    nr_read = _read_into(cast(socket.socket, self.socket), buffer, 0, nr_bytes)
    del buffer[nr_read:]
    return buffer


#: How much of a PDU is allocated before its bytes arrive. A peer declares a
#: PDU's length before anything is agreed (up to 4 GiB): the buffer starts at
#: most this large and grows only with what is received.
PDU_ALLOCATION_STEP = 16 * 1024 * 1024


def _read_into(
    sock: socket.socket, buffer: bytearray, start: int, count: int, step: int = PDU_ALLOCATION_STEP
) -> int:
    """Read ``count`` bytes from ``sock`` into ``buffer`` from offset ``start``,
    enlarging it (by what already arrived, at least ``step``) whenever it is
    full; return how many were read (fewer when the connection closed)."""
    received = 0
    while received < count:
        if len(buffer) == start + received:
            buffer.extend(bytes(min(count - received, max(received, step))))
        with memoryview(buffer) as view:
            got = _recv_into(sock, view[start + received :])
        received += got
        if start + received < len(buffer):  # the connection closed
            break
    return received


def _recv_into(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; return how much was read (less when the
    connection closed)."""
    nr_bytes = len(view)
    nr_read = 0
    while nr_read < nr_bytes:
        count = sock.recv_into(view[nr_read:], min(nr_bytes - nr_read, RECV_CHUNK))
        if not count:
            break
        nr_read += count
    return nr_read


_DUL_LOGGER = logging.getLogger("pynetdicom.dul")
_PDU_TYPES = frozenset(range(0x01, 0x08))


def _read_pdu_data(self: DULServiceProvider) -> None:
    """``DULServiceProvider._read_pdu_data`` with one copy of every PDU less.

    pynetdicom reads the 6-byte PDU header, then the PDU's data, and appends
    the data to the header: a second copy of every byte received. Here the
    data is read into a buffer that already holds the header, allocated as
    the data arrives beyond :data:`PDU_ALLOCATION_STEP`. Events and
    errors are pynetdicom's: Evt17 when the connection closes early, Evt19
    for an unknown or undecodable PDU.
    """
    transport = cast(AssociationSocket, self.socket)
    try:
        header = transport.recv(6)
    except (OSError, TimeoutError) as exc:
        _DUL_LOGGER.error("Connection closed before the entire PDU was received")
        _DUL_LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if len(header) != 6:
        self.event_queue.put("Evt17")
        return
    pdu_type, _, pdu_length = PDU_HEADER.unpack(header)
    if pdu_type not in _PDU_TYPES:
        _DUL_LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")
        return
    bytestream = bytearray(6 + min(pdu_length, PDU_ALLOCATION_STEP))
    bytestream[:6] = header
    try:
        received = _read_into(cast(socket.socket, transport.socket), bytestream, 6, pdu_length)
    except (OSError, TimeoutError) as exc:
        _DUL_LOGGER.error("Connection closed before the entire PDU was received")
        _DUL_LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    if received != pdu_length:
        _DUL_LOGGER.error(
            f"The received PDU is shorter than expected ({6 + received} of "
            f"{6 + pdu_length} bytes received)"
        )
        self.event_queue.put("Evt17")
        return
    if pdu_type == P_DATA_TF_TYPE:
        reader = pdata_reader(self)
        if reader is not None and reader.take(self, bytestream):
            return
        if _write_data_fragments(self, bytestream):
            return
    try:
        pdu, event = self._decode_pdu(bytestream)
        self.event_queue.put(event)
    except Exception as exc:
        _DUL_LOGGER.error("Unable to decode the received PDU data")
        _DUL_LOGGER.exception(exc)
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


def _write_data_fragments(dul: DULServiceProvider, pdu: bytearray) -> bool:
    """Write a P-DATA-TF PDU that only continues a data set straight into its file.

    pynetdicom turns every P-DATA-TF PDU into a PDU object, a primitive, a
    state machine event and a DIMSE call that finally writes a copy of each
    fragment to the file; for a whole-slide image sent in 128 KiB PDUs that
    is most of the receiving process's time. A PDU whose every item is a
    data set fragment that is not the last one, on the presentation context
    of the C-STORE whose data set is being written, changes nothing but the
    file (in state Sta6, Evt10 leads back to Sta6), so it is written here.
    Anything else (a command, the last fragment, another context, an item
    that does not add up, an event still queued before it, handlers bound to
    PDU events) returns False and takes pynetdicom's own path.
    """
    if not nothing_pending(dul):
        return False
    assoc = dul.assoc
    message = assoc.dimse.message
    target = getattr(message, "_data_set_file", None)
    if not isinstance(target, ReceivedFile):
        return False
    if assoc.get_handlers(evt.EVT_PDU_RECV) or assoc.get_handlers(evt.EVT_DATA_RECV):
        return False
    context_id = getattr(message, "context_id", None)
    items = pdv_items(pdu)
    if items is None or any(i.context_id != context_id or i.control & (COMMAND | LAST) for i in items):
        return False
    with memoryview(pdu) as view:
        for item in items:
            target.write(view[item.start : item.stop])
    return True


#: The last tag read to compare the data set with the request: SOP Instance UID.
_LAST_IDENTITY_TAG = 0x00080018


def _contradicts_request(
    path: Path, key: HeaderKey | None, sop_class_uid: str, sop_instance_uid: str
) -> bool:
    """True when the data set names another SOP Class or Instance than the request.

    The UIDs come from the file's header key when it has one, else from the
    start of the data set (read up to SOP Instance UID). A data set that
    cannot be read that far, or lacks either UID, is not a contradiction:
    :func:`check_file` and the engine judge it.
    """
    if key is not None:
        found = [key.sop_class_uid or "", key.sop_instance_uid]
    else:
        try:
            with path.open("rb") as fp:
                head = read_partial(fp, lambda tag, vr, length: tag > _LAST_IDENTITY_TAG, force=True)
            found = [str(head.get(keyword) or "") for keyword in ("SOPClassUID", "SOPInstanceUID")]
        except Exception:  # unreadable: check_file says why
            return False
    wanted = (sop_class_uid, sop_instance_uid)
    return any(value and value != expected for value, expected in zip(found, wanted, strict=True))


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on the association's socket.

    pynetdicom never sets TCP_NODELAY; without it every small C-STORE response
    waits for the peer's delayed ACK (about 40 ms).
    """
    sock = event.assoc.dul.socket
    raw = getattr(sock, "socket", None) if sock is not None else None
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ReceiveEvents(Protocol):
    """What the receiver tells the rest of the node: admitted entries and its counts.

    In the node the receiver runs in a process of its own
    (:mod:`gateway.receive_process`) and these calls cross to the main
    process, which owns the forwarder and the metrics registry.
    """

    def admitted(self, entry_id: str) -> None: ...

    def arriving(self, path: str, info: EntryInfo) -> None:
        """A large data set is arriving into ``path`` (see :mod:`gateway.cut_through`)."""

    def arrival_ended(self, path: str, entry_id: str | None) -> None:
        """Its receipt ended: admitted as ``entry_id``, or not (None)."""

    def record_association_accepted(self) -> None: ...

    def record_association_rejected(self, reason: str) -> None: ...

    def record_received(self, sop_class_uid: str | None, size_bytes: int) -> None: ...

    def record_refused(self, sop_class_uid: str | None, reason: str) -> None: ...


class _PolicyACSE(ACSE):
    """ACSE that rejects callers not on the allowlist before any negotiation.

    pynetdicom only checks calling AE titles, not (AE title, address) pairs,
    so the check runs here, where the A-ASSOCIATE-RQ is first known.
    """

    def __init__(
        self,
        assoc: Association,
        permits: Callable[[str, str], bool],
        ae_known: Callable[[str], bool],
        assoc_id: int,
        events: ReceiveEvents,
    ) -> None:
        super().__init__(assoc)
        self._events = events
        self._permits = permits
        self._ae_known = ae_known
        self._assoc_id = assoc_id

    def _reason(self, calling: str, address: str) -> str:
        return "host-not-allowed" if self._ae_known(calling) else "calling-ae-not-allowed"

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        calling = str(request.calling_ae_title).strip() if request is not None else ""
        address = self.assoc.requestor.address
        if not self._permits(calling, address):
            reason = self._reason(calling, address)
            _log().warning(
                "association.rejected",
                assoc_id=self._assoc_id,
                outcome="rejected",
                calling_ae=calling,
                peer=address,
                reason=reason,
            )
            self._events.record_association_rejected(reason)
            # Rejected permanent, by the service user, calling AE title not recognised
            self.send_reject(0x01, 0x01, 0x03)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


class _ArrivalReports:
    """The receiver's :class:`~gateway.store_scp.ArrivalWatch`: a large data
    set with a route is reported to the rest of the node as it arrives."""

    def __init__(self, receiver: Receiver, threshold: int) -> None:
        self._receiver = receiver
        self.threshold = threshold

    def arriving(self, assoc: Association, request: StoreRequest, path: str) -> bool:
        receiver = self._receiver
        calling = str(assoc.requestor.ae_title).strip()
        route = receiver.config.route_for(calling, request.sop_class_uid)
        if route is None:
            return False
        info = EntryInfo(
            calling_ae_title=calling,
            sop_class_uid=request.sop_class_uid,
            transfer_syntax_uid=request.transfer_syntax,
            route=route.name,
            size=0,
            assoc_id=receiver.assoc_id(assoc),
        )
        receiver.events.arriving(path, info)
        return True

    def ended(self, path: str, entry_id: str | None) -> None:
        self._receiver.events.arrival_ended(path, entry_id)


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    if config.tls.client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls.client_ca_file)
    return context


class Receiver:
    """The SCP: handlers bound to a pynetdicom AE, feeding the spool."""

    def __init__(
        self, config: Config, spool: Spool, events: ReceiveEvents, pixel_classes: frozenset[str]
    ) -> None:
        self.config = config
        self.spool = spool
        self.events = events
        #: SOP Classes whose instances must carry pixel data (see check_file).
        self.pixel_classes = pixel_classes
        #: The structure check, skipping what an earlier instance of a series
        #: showed to pass.
        self.checked = CheckedHeaders()
        self.ae = AE(ae_title=config.listen.ae_title)
        self.ae.maximum_associations = config.limits.max_associations
        self.ae.maximum_pdu_size = config.listen.max_pdu
        self.ae.network_timeout = 120
        self.ae.dimse_timeout = 120
        self.ae.require_called_aet = True
        for uid in config.sop_classes:
            self.ae.add_supported_context(uid, list(config.transfer_syntaxes))
        self.ae.add_supported_context("1.2.840.10008.1.1")  # Verification
        self._server: Any = None
        #: Association numbers, assigned in order of connection, for log lines.
        self._assoc_ids: weakref.WeakKeyDictionary[Association, int] = weakref.WeakKeyDictionary()
        self._next_assoc_id = itertools.count(1)
        self._ids_lock = threading.Lock()
        threshold = config.forwarding.cut_through_bytes
        #: Tells the main process of large data sets while they arrive.
        self._watch = _ArrivalReports(self, threshold) if threshold else None

    @property
    def listening(self) -> bool:
        """True while the DICOM port is open."""
        return self._server is not None

    def assoc_id(self, assoc: Association) -> int:
        """The number of an accepted association (0 if it was never numbered)."""
        with self._ids_lock:
            return self._assoc_ids.get(assoc, 0)

    def permits(self, ae_title: str, address: str) -> bool:
        return any(c.permits(ae_title, address) for c in self.config.allowed_callers)

    def ae_known(self, ae_title: str) -> bool:
        return any(c.ae_title in ("*", ae_title) for c in self.config.allowed_callers)

    def _on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event)
        if event.assoc.is_acceptor:
            with self._ids_lock:
                assoc_id = next(self._next_assoc_id)
                self._assoc_ids[event.assoc] = assoc_id
            event.assoc.acse = _PolicyACSE(
                event.assoc, self.permits, self.ae_known, assoc_id, self.events
            )
            serve_stores(event.assoc, self._store_direct, self._received_file, self._watch)

    def _received_file(self) -> ReceivedFile:
        """The file a data set is received into: in a spool slot, which
        becomes its entry (:meth:`Spool.slot`)."""
        slot = self.spool.slot()
        try:
            return ReceivedFile.in_directory(slot, INSTANCE)
        except OSError:
            shutil.rmtree(slot, ignore_errors=True)
            raise

    def _on_conn_close(self, event: evt.Event) -> None:
        stores = direct_stores(event.assoc.dul)
        if stores is not None:
            stores.discard()

    def _on_accepted(self, event: evt.Event) -> None:
        self.events.record_association_accepted()
        _log().info(
            "association.accepted",
            assoc_id=self.assoc_id(event.assoc),
            outcome="accepted",
            calling_ae=str(event.assoc.requestor.ae_title).strip(),
            peer=event.assoc.requestor.address,
        )

    def _on_rejected(self, event: evt.Event) -> None:
        if len(self.ae.active_associations) > self.ae.maximum_associations:
            _log().warning("association.rejected", outcome="rejected", reason="too-many-associations")
            self.events.record_association_rejected("too-many-associations")

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """EVT_C_STORE handler, for the requests pynetdicom serves itself (see :mod:`gateway.store_scp`)."""
        request = cast(C_STORE, event.request)
        spooled = getattr(request, "_dataset_file", None)
        answer = self._store(
            event.assoc,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            Path(event.dataset_path),
            spooled if isinstance(spooled, ReceivedFile) else None,
        )
        if answer.then is not None:  # pynetdicom sends the response only after this returns
            answer.then()
        return answer.status

    def _store_direct(
        self, assoc: Association, request: StoreRequest, received: ReceivedFile
    ) -> StoreAnswer:
        """The handler of :mod:`gateway.store_scp`'s requests."""
        return self._store(
            assoc, request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax,
            Path(received.name), received,
        )  # fmt: skip

    def _store(
        self,
        assoc: Association,
        sop_class_uid: str,
        instance_uid: str,
        transfer_syntax: str,
        received: Path,
        spooled: ReceivedFile | None,
    ) -> StoreAnswer:
        """Admit one instance to the spool; the status tells the sender what
        happened. An admitted instance is reported (metrics, log line, the
        forwarder) once the sender has its Success: it is durable in the spool
        by then, and the forwarder's rescan finds an entry whose report was
        lost."""
        calling = str(assoc.requestor.ae_title).strip()
        assoc_id = self.assoc_id(assoc)
        refused = partial(self._refused, self.events, assoc_id, calling, sop_class_uid)
        started = time.monotonic()
        try:
            if spooled is not None:
                spooled.finish_writeback()
            if spooled is not None and spooled.error is not None:
                received.unlink(missing_ok=True)
                full = spooled.error.errno in (errno.ENOSPC, errno.EDQUOT)
                refused("spool-full" if full else "spool-write-failed", STATUS_OUT_OF_RESOURCES,
                        spooled.error)
                return StoreAnswer(STATUS_OUT_OF_RESOURCES)
            size = received.stat().st_size
            if size > self.config.limits.max_instance_bytes:
                received.unlink(missing_ok=True)
                refused("instance-too-large", STATUS_TOO_LARGE)
                return StoreAnswer(STATUS_TOO_LARGE)
            route = self.config.route_for(calling, sop_class_uid)
            if route is None:
                received.unlink(missing_ok=True)
                refused("no-route", STATUS_NOT_AUTHORIZED)
                return StoreAnswer(STATUS_NOT_AUTHORIZED)
            key = header_key(received, decoded=False)  # the check decodes no value
            if _contradicts_request(received, key, sop_class_uid, instance_uid):
                received.unlink(missing_ok=True)
                refused("data-set-mismatch", STATUS_DATA_SET_MISMATCH)
                return StoreAnswer(STATUS_DATA_SET_MISMATCH)
            if self.checked.check_keyed(received, key, self.pixel_classes) is not None:
                received.unlink(missing_ok=True)
                refused("malformed-data-set", STATUS_MALFORMED)
                return StoreAnswer(STATUS_MALFORMED)
            info = EntryInfo(
                calling_ae_title=calling,
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax,
                route=route.name,
                size=size,
                assoc_id=assoc_id,
            )
            entry_id = self.spool.admit(received, info)
        except SpoolFullError:
            refused("spool-full", STATUS_OUT_OF_RESOURCES)
            return StoreAnswer(STATUS_OUT_OF_RESOURCES)
        except OSError as exc:
            received.unlink(missing_ok=True)
            refused("spool-write-failed", STATUS_OUT_OF_RESOURCES, exc)
            return StoreAnswer(STATUS_OUT_OF_RESOURCES)
        except Exception as exc:  # never let a handler error become a crash or a Success
            received.unlink(missing_ok=True)
            refused("internal-error", STATUS_CANNOT_PROCESS, exc)
            return StoreAnswer(STATUS_CANNOT_PROCESS)
        spool_seconds = time.monotonic() - started

        def report() -> None:
            self.events.record_received(sop_class_uid, size)
            _log().info(
                "instance.received",
                assoc_id=assoc_id,
                outcome="accepted",
                calling_ae=calling,
                sop_class=metrics.sop_class_label(sop_class_uid),
                size_bytes=size,
                spool_seconds=spool_seconds,
            )
            self.events.admitted(entry_id)

        return StoreAnswer(STATUS_SUCCESS, report, entry_id)

    @staticmethod
    def _refused(
        events: ReceiveEvents,
        assoc_id: int,
        calling: str,
        sop_class_uid: str,
        reason: str,
        status: int,
        exc: Exception | None = None,
    ) -> None:
        """Log and count a failure status (codes only: the log guard passes no free text)."""
        fields: dict[str, object] = {"error_type": type(exc).__name__} if exc else {}
        events.record_refused(sop_class_uid, reason)
        _log().warning(
            "instance.refused",
            assoc_id=assoc_id,
            outcome="rejected",
            calling_ae=calling,
            sop_class=metrics.sop_class_label(sop_class_uid),
            reason=reason,
            status=status,
            **fields,
        )

    def start(self) -> tuple[str, int]:
        """Start listening in the background; return the bound address."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = self.ae.start_server(
            (self.config.listen.host, self.config.listen.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=server_ssl_context(self.config),
        )
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

"""C-STORE requests served by the thread that reads their PDUs.

pynetdicom serves a C-STORE request in four hand-offs: its DUL thread turns
each received PDU into objects and runs the state machine, the DIMSE
provider assembles the message and decodes the command set with pydicom, the
association's thread takes the message from a queue and calls the handler,
and the response, encoded with pydicom, goes back to the DUL thread through
another queue. For the small instances of a study that is most of the
receiving process's CPU, and the sender waits for all of it before it sends
the next instance.

On an association marked with :func:`serve_stores`, the DUL thread serves a
C-STORE request itself, from the PDU that carries its command set: it
decodes the command (implicit VR little endian, a handful of elements),
writes the File Meta Information and the data set fragments into a
:class:`~gateway.received_file.ReceivedFile` exactly as pynetdicom's chunked
receive would, calls the handler once the last fragment is in, and writes
the C-STORE response (the one pynetdicom would write, byte for byte).

Everything else takes pynetdicom's own path, unchanged: another command
(C-ECHO), a command set that does not fit in one PDU or holds an element a
C-STORE request does not have, a presentation context that was not accepted
or has another abstract syntax, a UID that is not one, a PDU read while
pynetdicom has a message or an event in hand, an association that is being
released, handlers bound to PDU, data or DIMSE events.

A :class:`ArrivalWatch` is told when a data set being received grows past
its threshold, and how its receipt ended (:mod:`gateway.cut_through`
forwards it meanwhile).

Once a request is taken here, every P-DATA PDU up to its last data set
fragment must continue that data set (fragments on its presentation
context). Anything else breaks PS3.8's rules for a message: the file is
deleted and the association aborted, as pynetdicom aborts on a PDU it cannot
take (Evt19). A connection that ends mid data set has its file deleted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from gateway.dimse import (
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    MESSAGE_ID,
    command_pdu,
    decode_store_request,
    encode_store_response,
    file_meta,
)
from gateway.pdu import (
    COMMAND,
    ESTABLISHED,
    LAST,
    WATCHING_EVENTS,
    Item,
    nothing_pending,
    pdata_reader,
    pdv_items,
    set_pdata_reader,
)
from gateway.received_file import ReceivedFile


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """A C-STORE request as the handler needs it."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    #: The accepted transfer syntax of the presentation context.
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class StoreAnswer:
    """A handler's answer: the C-STORE status, and what to do once the sender
    has it (reports that need not hold the response back)."""

    status: int
    then: Callable[[], None] | None = None
    #: The spool entry the data set became, when it was admitted.
    entry_id: str | None = None


class ArrivalWatch(Protocol):
    """Told about the data sets that grow large while they arrive."""

    #: Bytes written to the received file (meta included) before :meth:`arriving`.
    threshold: int

    def arriving(self, assoc: Association, request: StoreRequest, path: str) -> bool:
        """The data set being received into ``path`` passed the threshold;
        True when it is watched, and :meth:`ended` will be told."""

    def ended(self, path: str, entry_id: str | None) -> None:
        """The watched data set's receipt ended: admitted as ``entry_id`` (the
        sender is answered by now), or refused or cut short (None; the file
        is deleted)."""


#: Opens the file a data set is received into (in the spool's ``incoming/``).
ReceivedFiles = Callable[[], ReceivedFile]

#: Admits the received file and answers. Called in the DUL thread with the
#: file still open, which is closed and deleted (if the handler did not move
#: it) afterwards, as pynetdicom does.
StoreHandler = Callable[[Association, StoreRequest, ReceivedFile], StoreAnswer]

#: Status when the handler raised (pynetdicom's: Cannot Understand).
STATUS_HANDLER_FAILED = 0xC211


def serve_stores(
    assoc: Association, handler: StoreHandler, files: ReceivedFiles, watch: ArrivalWatch | None = None
) -> DirectStores:
    """Serve the C-STORE requests of ``assoc`` in its DUL thread (see the module);
    data sets are received into the files ``files`` opens."""
    stores = DirectStores(assoc, handler, files, watch)
    set_pdata_reader(assoc.dul, stores)
    return stores


def direct_stores(dul: DULServiceProvider) -> DirectStores | None:
    """The direct C-STORE service of an association, if it has one."""
    stores = pdata_reader(dul)
    return stores if isinstance(stores, DirectStores) else None


class DirectStores:
    """Serves the C-STORE requests of one association in its DUL thread (see the module)."""

    def __init__(
        self,
        assoc: Association,
        handler: StoreHandler,
        files: ReceivedFiles,
        watch: ArrivalWatch | None = None,
    ) -> None:
        self._assoc = assoc
        self._handler = handler
        self._files = files
        self._watch = watch
        self._request: StoreRequest | None = None
        self._file: ReceivedFile | None = None
        #: Whether the watch was told of the data set being received.
        self._watched = False
        #: :meth:`discard` may run in another thread than the DUL's.
        self._lock = threading.Lock()
        self._closed = False
        #: Requests served here (for tests and the curious).
        self.served = 0

    def take(self, dul: DULServiceProvider, pdu: bytearray) -> bool:
        """Serve a received P-DATA-TF PDU (header included) here; False leaves
        it to pynetdicom, untouched."""
        with self._lock:
            if self._closed:
                return False
            if self._request is None:
                return self._begin(dul, pdu)
            self._continue(dul, pdu)
            return True

    def discard(self) -> None:
        """The connection ended: delete a data set still being received."""
        with self._lock:
            self._closed = True
            self._drop()

    def _drop(self) -> None:
        received, self._file, self._request = self._file, None, None
        if received is not None:
            received.delete()
            self._ended(received, None)

    def _ended(self, received: ReceivedFile, entry_id: str | None) -> None:
        if self._watched and self._watch is not None:
            self._watched = False
            self._watch.ended(received.name, entry_id)

    def _pynetdicom_idle(self, dul: DULServiceProvider) -> bool:
        assoc = self._assoc
        return (
            nothing_pending(dul)
            and assoc.dimse.message is None
            and assoc.is_established
            and not assoc._sent_release
            and not any(assoc.get_handlers(event) for event in WATCHING_EVENTS)
        )

    def _begin(self, dul: DULServiceProvider, pdu: bytearray) -> bool:
        items = pdv_items(pdu)
        if items is None or not items[0].control & COMMAND or not self._pynetdicom_idle(dul):
            return False
        context_id = items[0].context_id
        command = bytearray()
        for index, item in enumerate(items):
            if item.context_id != context_id or not item.control & COMMAND:
                return False
            command += pdu[item.start : item.stop]
            if item.control & LAST:
                data = items[index + 1 :]
                break
        else:
            return False  # the command set goes on in another PDU
        if not self._data_items_fit(data, context_id):
            return False
        request = self._request_of(context_id, bytes(command))
        if request is None:
            return False
        try:
            received = self._files()
        except OSError:
            return False  # pynetdicom's path meets the same error and says so
        received.write(file_meta(request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax))
        self._request, self._file = request, received
        self._write(dul, pdu, data)
        return True

    @staticmethod
    def _data_items_fit(items: list[Item], context_id: int) -> bool:
        """Data set fragments on ``context_id``, the last one (if any) last."""
        for index, item in enumerate(items):
            if item.context_id != context_id or item.control & COMMAND:
                return False
            if item.control & LAST and index != len(items) - 1:
                return False
        return True

    def _request_of(self, context_id: int, command: bytes) -> StoreRequest | None:
        values = decode_store_request(command)
        if values is None:
            return None
        context = self._assoc._accepted_cx.get(context_id)
        sop_class_uid = str(values[AFFECTED_SOP_CLASS])
        if context is None or context.abstract_syntax != sop_class_uid or not context.transfer_syntax:
            return None
        if uid_to_service_class(sop_class_uid) is not StorageServiceClass:
            return None
        request = StoreRequest(
            context_id=context_id,
            message_id=int(values[MESSAGE_ID]),
            sop_class_uid=sop_class_uid,
            sop_instance_uid=str(values[AFFECTED_SOP_INSTANCE]),
            transfer_syntax=str(context.transfer_syntax[0]),
        )
        peer_maximum = self._assoc.requestor.maximum_length or 0
        if peer_maximum and peer_maximum < len(_response_pdu(request, 0)):
            return None
        return request

    def _continue(self, dul: DULServiceProvider, pdu: bytearray) -> None:
        request = self._request
        assert request is not None
        items = pdv_items(pdu)
        if items is None or not self._data_items_fit(items, request.context_id):
            self._drop()
            dul.event_queue.put("Evt19")  # pynetdicom aborts the association
            return
        self._write(dul, pdu, items)

    def _write(self, dul: DULServiceProvider, pdu: bytearray, items: list[Item]) -> None:
        received = self._file
        assert received is not None
        with memoryview(pdu) as view:
            for item in items:
                received.write(view[item.start : item.stop])
        if items and items[-1].control & LAST:
            self._finish(dul)
        elif self._watch is not None and not self._watched and received.written >= self._watch.threshold:
            assert self._request is not None
            self._watched = self._watch.arriving(self._assoc, self._request, received.name)

    def _finish(self, dul: DULServiceProvider) -> None:
        request, received = self._request, self._file
        assert request is not None and received is not None
        self._request, self._file = None, None
        try:
            answer = self._handler(self._assoc, request, received)
        except Exception:  # the handler answers for its own errors; this is a last resort
            answer = StoreAnswer(STATUS_HANDLER_FAILED)
        finally:  # as pynetdicom: the handler moved the file unless it refused it
            received.delete()
        self.served += 1
        transport: Any = dul.socket
        if dul.state_machine.current_state == ESTABLISHED and self._assoc.is_established and transport:
            transport.send(_response_pdu(request, answer.status))
        self._ended(received, answer.entry_id)
        if answer.then is not None:
            answer.then()


def _response_pdu(request: StoreRequest, status: int) -> bytes:
    command = encode_store_response(
        request.message_id, request.sop_class_uid, request.sop_instance_uid, status
    )
    return command_pdu(request.context_id, command)

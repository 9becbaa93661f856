"""C-STORE requests served in the DUL thread (gateway.store_scp).

The encodings are checked against pynetdicom's and pydicom's own, for any
UIDs and numbers; the service is checked on real associations: dcmtk's
storescu and pynetdicom's SCU send to a pynetdicom server that serves its
C-STOREs through :func:`serve_stores`, and raw PDUs break the rules.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    SecondaryCaptureImageStorage,
    Verification,
    VLWholeSlideMicroscopyImageStorage,
)

from gateway.dimse import command_pdu, decode_store_request, encode_store_response, file_meta
from gateway.receive import configure_receiving, set_nodelay
from gateway.received_file import ReceivedFile
from gateway.store_scp import StoreAnswer, StoreRequest, direct_stores, serve_stores
from gateway.synthetic import PlantedPHI, write_secondary_capture
from tests.peers import free_port, storescu

uids = st.lists(st.integers(min_value=0, max_value=10**12), min_size=2, max_size=8).map(
    lambda parts: ".".join(map(str, parts))
).filter(lambda uid: len(uid) <= 64)
shorts = st.integers(min_value=0, max_value=0xFFFF)


def _request_command(
    message_id: int, sop_class: str, sop_instance: str, priority: int = 2, *, data_set: bool = True
) -> bytes:
    """A C-STORE request's command set as pynetdicom encodes it."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = priority
    if data_set:
        primitive.DataSet = io.BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdata = next(iter(message.encode_msg(1, 0)))
    _, data = pdata.presentation_data_value_list[0]
    assert data[0] == 0x03  # the whole command set, last fragment
    return bytes(data[1:])


@settings(max_examples=200, deadline=None)
@given(message_id=shorts, priority=st.sampled_from([0, 1, 2]), sop_class=uids, sop_instance=uids)
def test_the_request_decodes_as_pynetdicom_encodes_it(
    message_id: int, priority: int, sop_class: str, sop_instance: str
) -> None:
    values = decode_store_request(_request_command(message_id, sop_class, sop_instance, priority))
    assert values is not None
    assert values[0x0110] == message_id
    assert values[0x0700] == priority
    assert values[0x0002] == sop_class
    assert values[0x1000] == sop_instance


def test_other_commands_and_odd_command_sets_are_left_to_pynetdicom() -> None:
    store = _request_command(1, "1.2.3", "1.2.3.4")
    echo = bytes.fromhex("0000000004000000") + b"\x38\x00\x00\x00"  # group length only
    assert decode_store_request(echo) is None
    assert decode_store_request(store[:-3]) is None  # cut short
    error_comment = bytes.fromhex("00000209") + b"\x02\x00\x00\x00" + b"no"  # (0000,0902)
    assert decode_store_request(store + error_comment) is None
    not_ascii = store.replace(b"1.2.3.4", b"1.2.\xff.4")
    assert decode_store_request(not_ascii) is None
    assert decode_store_request(_request_command(1, "1.2.3", "1.2.3.4", data_set=False)) is None


@settings(max_examples=200, deadline=None)
@given(message_id=shorts, status=shorts, sop_class=uids, sop_instance=uids, context_id=st.integers(1, 255))
def test_the_response_is_the_one_pynetdicom_writes(
    message_id: int, status: int, sop_class: str, sop_instance: str, context_id: int
) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    pdata = next(iter(message.encode_msg(context_id, 0)))
    expected = P_DATA_TF()
    expected.from_primitive(pdata)
    command = encode_store_response(message_id, sop_class, sop_instance, status)
    assert command_pdu(context_id, command) == expected.encode()


@settings(max_examples=200, deadline=None)
@given(sop_class=uids, sop_instance=uids, syntax=st.sampled_from([ExplicitVRLittleEndian, JPEGBaseline8Bit]))
def test_the_file_meta_is_the_one_pynetdicom_writes(sop_class: str, sop_instance: str, syntax: str) -> None:
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    write_file_meta_info(out, meta)  # type: ignore[arg-type]
    assert file_meta(sop_class, sop_instance, syntax) == out.getvalue()


# ---------------------------------------------------------------------------
# On real associations


class Server:
    """A pynetdicom SCP serving C-STOREs through :func:`serve_stores`; the
    handler keeps a copy of each received file and answers ``status``."""

    def __init__(self, directory: Path, status: Callable[[], int] = lambda: 0x0000,
                 extra_handlers: list[Any] | None = None,
                 then: Callable[[], None] | None = None) -> None:
        self.then = then
        self.incoming = directory / "incoming"
        self.incoming.mkdir(parents=True)
        self.kept = directory / "kept"
        self.kept.mkdir()
        self.status = status
        self.direct: list[StoreRequest] = []
        self.by_pynetdicom: list[str] = []
        self.assocs: list[Any] = []
        configure_receiving(self.incoming)
        self.ae = AE("STORE_SCP")
        self.ae.maximum_pdu_size = 16384
        for sop_class in (VLWholeSlideMicroscopyImageStorage, SecondaryCaptureImageStorage):
            self.ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                      JPEGBaseline8Bit])
        self.ae.add_supported_context(Verification)
        self.port = free_port()
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_CONN_OPEN, self._open), (evt.EVT_CONN_CLOSE, self._close),
                          (evt.EVT_C_STORE, self._pynetdicom_store),
                          (evt.EVT_C_ECHO, lambda event: 0x0000), *(extra_handlers or [])],
        )

    def _open(self, event: evt.Event) -> None:
        set_nodelay(event)
        self.assocs.append(event.assoc)
        serve_stores(event.assoc, self._direct_store, self._file)

    def _file(self) -> ReceivedFile:
        """As the gateway: a file in a directory of its own, deleted with it."""
        directory = self.incoming / uuid.uuid4().hex
        directory.mkdir()
        return ReceivedFile.in_directory(directory, "instance.dcm")

    def _close(self, event: evt.Event) -> None:
        stores = direct_stores(event.assoc.dul)
        if stores is not None:
            stores.discard()

    def _direct_store(self, assoc: Any, request: StoreRequest, received: ReceivedFile) -> StoreAnswer:
        assert threading.current_thread() is assoc.dul  # served where the PDUs are read
        self.direct.append(request)
        received.flush()
        Path(received.name).rename(self.kept / f"{len(self.direct)}.dcm")
        return StoreAnswer(self.status(), self.then)

    def _pynetdicom_store(self, event: evt.Event) -> int:
        self.by_pynetdicom.append(str(event.request.AffectedSOPInstanceUID))
        Path(event.dataset_path).rename(self.kept / f"p{len(self.by_pynetdicom)}.dcm")
        return self.status()

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "scp")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Synthetic secondary captures (one PHI card each), sent in many 16 KiB PDUs."""
    directory = tmp_path_factory.mktemp("cstore-data")
    return [write_secondary_capture(directory / f"sc{i}.dcm", PlantedPHI.create(seed=i), burned_in=False)
            for i in range(3)]


def _data_set_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file as stored (after the file meta)."""
    with path.open("rb") as fp:
        ds = dcmread(fp, stop_before_pixels=True)
        fp.seek(0)
        data = fp.read()
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return data[meta_end:]


def test_storescu_instances_are_served_in_the_dul_thread_bit_for_bit(
    server: Server, instances: list[Path]
) -> None:
    result = storescu(server.port, instances, called="STORE_SCP")
    assert result.returncode == 0, result.stderr
    assert [r.sop_instance_uid for r in server.direct] == [
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in instances
    ]
    assert server.by_pynetdicom == []
    for number, source in enumerate(instances, start=1):
        kept = server.kept / f"{number}.dcm"
        request = server.direct[number - 1]
        assert kept.read_bytes() == file_meta(
            request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax
        ) + _data_set_bytes(source)
        assert dcmread(kept).SOPInstanceUID == request.sop_instance_uid
    assert list(server.incoming.iterdir()) == []


def _associate(server: Server) -> Any:
    ae = AE("SENDER")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="STORE_SCP")
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize(("answer", "expected"), [(0xA700, 0xA700), (None, 0xC211)])
def test_the_handler_status_reaches_the_sender_and_echo_keeps_pynetdicom_path(
    tmp_path: Path, instances: list[Path], answer: int | None, expected: int
) -> None:
    def status() -> int:
        if answer is None:
            raise RuntimeError("handler failed")
        return answer

    srv = Server(tmp_path / "scp", status=status)
    try:
        assoc = _associate(srv)
        try:
            assert assoc.send_c_echo().Status == 0x0000
            reply = assoc.send_c_store(dcmread(instances[0]))
            assert reply.Status == expected
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        assert len(srv.direct) == 1
        assert list(srv.incoming.iterdir()) == []
    finally:
        srv.stop()


def test_what_follows_the_answer_does_not_hold_the_response_back(
    tmp_path: Path, instances: list[Path]
) -> None:
    """The handler's reports run once the sender has its response: here they
    wait until the sender has it, which would be never if they ran first."""
    answered = threading.Event()
    ran: list[bool] = []

    def then() -> None:
        ran.append(answered.wait(30))

    srv = Server(tmp_path / "scp", then=then)
    try:
        assoc = _associate(srv)
        try:
            assert assoc.send_c_store(dcmread(instances[0])).Status == 0x0000
            answered.set()
            _wait(lambda: bool(ran))
            assert ran == [True]
        finally:
            assoc.release()
    finally:
        srv.stop()


def test_handlers_that_watch_dimse_messages_keep_pynetdicom_path(
    tmp_path: Path, instances: list[Path]
) -> None:
    seen: list[object] = []
    srv = Server(tmp_path / "scp", extra_handlers=[(evt.EVT_DIMSE_RECV, lambda event: seen.append(1))])
    try:
        result = storescu(srv.port, instances[:1], called="STORE_SCP")
        assert result.returncode == 0, result.stderr
        assert srv.direct == []
        assert len(srv.by_pynetdicom) == 1 and seen
    finally:
        srv.stop()


def _store_pdus(instance: Path, context_id: int, max_pdu: int) -> list[bytes]:
    """The PDUs pynetdicom would send for a C-STORE of ``instance``."""
    ds = dcmread(instance)
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    with instance.open("rb") as fp:
        data = fp.read()[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength):]
    primitive.DataSet = io.BytesIO(data)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for pdata in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(pdata)
        pdus.append(pdu.encode())
    return pdus


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("breach", ["new-command", "other-context", "connection-lost"])
def test_a_data_set_cut_short_is_deleted_and_a_broken_message_aborts(
    server: Server, instances: list[Path], breach: str
) -> None:
    assoc = _associate(server)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == SecondaryCaptureImageStorage)
    pdus = _store_pdus(instances[0], context_id, 4096)
    assert len(pdus) > 3
    socket = assoc.dul.socket
    for pdu in pdus[:2]:  # the command and the first fragment
        socket.send(pdu)
    _wait(lambda: len(list(server.incoming.iterdir())) == 1)
    if breach == "new-command":
        socket.send(pdus[0])
    elif breach == "other-context":
        socket.send(pdus[2][:8] + bytes([context_id + 2]) + pdus[2][9:])
    else:
        socket.socket.close()
    _wait(lambda: list(server.incoming.iterdir()) == [])
    if breach != "connection-lost":
        _wait(lambda: assoc.is_aborted)
    _wait(lambda: all(not a.is_alive() for a in server.assocs))
    assert server.direct == [] and server.by_pynetdicom == []
    if not assoc.is_aborted:
        assoc.abort()

"""C-STORE requests sent by the forwarder's own sender (gateway.store_scu).

The request and the File Meta reading are checked against pynetdicom's and
pydicom's, the response reader against the PDUs it must and must not take,
and the whole send against real archives: dcmtk's storescp (bit for bit, in
tests/test_forward_link.py) and a pynetdicom SCP answering a failure.
"""

from __future__ import annotations

import io
import queue
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from gateway.config import DicomDestination
from gateway.dimse import command_pdu, encode_store_request, encode_store_response, read_file_meta
from gateway.forward import DicomLink, SendError
from gateway.receive import configure_pynetdicom
from gateway.store_scu import DirectResponse, ResponseReader
from gateway.synthetic import PlantedPHI, write_secondary_capture
from tests.peers import free_port

uids = st.lists(st.integers(min_value=0, max_value=10**12), min_size=2, max_size=8).map(
    lambda parts: ".".join(map(str, parts))
).filter(lambda uid: len(uid) <= 64)


@settings(max_examples=200, deadline=None)
@given(message_id=st.integers(0, 0xFFFF), sop_class=uids, sop_instance=uids)
def test_the_request_is_the_one_pynetdicom_writes(message_id: int, sop_class: str, sop_instance: str) -> None:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 2  # pynetdicom's default
    primitive.DataSet = io.BytesIO(b"\0" * 8)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    _, data = next(iter(message.encode_msg(1, 0))).presentation_data_value_list[0]
    assert encode_store_request(message_id, sop_class, sop_instance) == bytes(data[1:])


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scu") / "sc.dcm"
    return write_secondary_capture(path, PlantedPHI.create(seed=7), burned_in=False)


def test_the_file_meta_is_read_as_pydicom_reads_it(instance: Path) -> None:
    with instance.open("rb") as fp:
        found = read_file_meta(fp)
        meta = dcmread(instance, stop_before_pixels=True).file_meta
        assert found is not None
        sop_class, sop_instance, syntax, start = found
        assert (sop_class, sop_instance, syntax) == (
            meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID
        )
        assert start == 132 + 12 + meta.FileMetaInformationGroupLength
    data = instance.read_bytes()
    for broken in (data[:100], b"\0" * 128 + b"DICX" + data[132:], data[:200]):
        assert read_file_meta(io.BytesIO(broken)) is None


class FakeDul:
    """The parts of an association's DUL and DIMSE provider the reader looks at."""

    def __init__(self) -> None:
        self.state_machine = SimpleNamespace(current_state="Sta6")
        self.event_queue: queue.Queue[str] = queue.Queue()
        self._recv_pdu: queue.Queue[object] = queue.Queue()
        self.assoc = SimpleNamespace(dimse=SimpleNamespace(message=None, msg_queue=queue.Queue()))


def _response(context_id: int = 3, message_id: int = 9, status: int = 0) -> bytearray:
    return bytearray(command_pdu(context_id, encode_store_response(message_id, "1.2.3", "1.2.3.4", status)))


def test_the_reader_queues_the_status_of_the_response_it_expects() -> None:
    dul = FakeDul()
    reader = ResponseReader(dul.assoc)
    assert not reader.take(dul, _response())  # nothing expected
    reader.expect(3, 9)
    assert reader.take(dul, _response(status=0xA700))
    context_id, response = dul.assoc.dimse.msg_queue.get_nowait()
    assert context_id == 3 and isinstance(response, DirectResponse) and response.status == 0xA700
    assert not reader.take(dul, _response())  # expected once


@pytest.mark.parametrize(
    "case", ["other message", "other context", "two items", "pynetdicom busy", "not a response"]
)
def test_the_reader_leaves_anything_else_to_pynetdicom(case: str) -> None:
    dul = FakeDul()
    reader = ResponseReader(dul.assoc)
    reader.expect(3, 9)
    pdu = _response()
    if case == "other message":
        pdu = _response(message_id=10)
    elif case == "other context":
        pdu = _response(context_id=5)
    elif case == "two items":
        body = pdu[6:]
        pdu = bytearray(pdu[:2] + (2 * len(body)).to_bytes(4, "big") + body + body)
    elif case == "pynetdicom busy":
        dul.event_queue.put("Evt10")
    else:
        pdu = bytearray(command_pdu(3, encode_store_request(9, "1.2.3", "1.2.3.4")))
    assert not reader.take(cast(Any, dul), pdu)
    assert dul.assoc.dimse.msg_queue.empty()


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC000])
def test_the_archive_status_decides(tmp_path: Path, instance: Path, status: int) -> None:
    configure_pynetdicom()
    scp = AE("ARCHIVE")
    scp.add_supported_context(SecondaryCaptureImageStorage, dcmread(instance).file_meta.TransferSyntaxUID)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
    link = DicomLink(DicomDestination("archive", "ARCHIVE", "127.0.0.1", port, None), "GATEWAY", 1 << 20)
    try:
        meta = dcmread(instance, stop_before_pixels=True).file_meta
        sop_class, syntax = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        for _ in range(2):
            if status in (0x0000, 0xB000):
                assert link.send(instance, sop_class, syntax) == status
            else:
                with pytest.raises(SendError, match=f"0x{status:04X}"):
                    link.send(instance, sop_class, syntax)
        assert link.reader is not None and link.reader.read == 2
    finally:
        link.close()
        server.shutdown()

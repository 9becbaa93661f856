"""The forwarder's association to a DICOM archive, against dcmtk's storescp:
P-DATA written by the sending thread arrives whole and in order, and a
connection lost while sending fails the C-STORE at once instead of hanging."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import DicomDestination
from gateway.deid.report import PixelReference
from gateway.deid.stream import _file_meta_end
from gateway.forward import DicomLink, SendError
from gateway.priority import FORWARD_NICE, lower_thread_priority
from gateway.receive import configure_pynetdicom
from gateway.store_scu import DirectPData, StoreSource
from gateway.synthetic import write_large_volume
from tests.peers import Storescp

VOLUME_BYTES = 8 * 2**20


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_large_volume(tmp_path_factory.mktemp("link") / "volume.dcm", VOLUME_BYTES)



def _link(archive: Storescp) -> DicomLink:
    configure_pynetdicom()
    dest = DicomDestination("archive", archive.ae_title, "127.0.0.1", archive.port, None)
    return DicomLink(dest, "GATEWAY", 4 * 2**20)


def _data_set(path: Path) -> bytes:
    data = path.read_bytes()
    return data[_file_meta_end(data, 132) :]


def _sop_class_and_syntax(path: Path) -> tuple[str, str]:
    from pydicom import dcmread

    meta = dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def test_an_instance_of_many_pdus_arrives_bit_for_bit(volume: Path, archive: Storescp) -> None:
    link = _link(archive)
    try:
        for _ in range(2):  # a second C-STORE on the kept association
            assert link.send(volume, *_sop_class_and_syntax(volume)) == 0x0000
        writer = link.pdata
        assert writer is not None
        # storescp takes 128 KiB PDUs: every one of them written by the sender,
        # and both responses read by the link's own reader
        assert writer.direct >= 2 * VOLUME_BYTES // 131072
        assert link.reader is not None and link.reader.read == 2
    finally:
        link.close()
    stored = archive.files()
    assert stored
    assert all(_data_set(path) == _data_set(volume) for path in stored)


def _by_reference(volume: Path, directory: Path) -> StoreSource:
    """``volume`` as the engine leaves it with its pixel data by reference:
    a file without the bytes in the middle, and where they are."""
    data = volume.read_bytes()
    start, end = len(data) // 3, 2 * len(data) // 3
    head = directory / "head.dcm"
    head.write_bytes(data[:start] + data[end:])
    return StoreSource(head, PixelReference(volume, start, end, start))


def test_pixel_data_by_reference_arrives_in_place(
    volume: Path, archive: Storescp, tmp_path: Path
) -> None:
    link = _link(archive)
    try:
        source = _by_reference(volume, tmp_path)
        assert link.send(source, *_sop_class_and_syntax(volume)) == 0
        assert source.pixels is not None  # sent from the two files, not filled in
    finally:
        link.close()
    assert [_data_set(path) for path in archive.files()] == [_data_set(volume)]


def _sent_once_then_failing(
    volume: Path, archive: Storescp, failure: Callable[[DicomLink], None]
) -> tuple[DicomLink, DirectPData, int]:
    """A link that sent ``volume`` once; on its next send ``failure`` strikes
    before the fifth PDU of the data set is written. Returns the link, the
    first association's writer and how many PDUs it had written."""
    link = _link(archive)
    assert link.send(volume, *_sop_class_and_syntax(volume)) == 0x0000
    writer = link.pdata
    assert writer is not None
    sent_before = writer.direct
    queue_pdu, write, write_from_files = link.assoc.dul.send_pdu, writer.write, writer.write_from_files
    struck: list[bool] = []

    def strike() -> None:
        if writer.direct == sent_before + 4 and not struck:
            struck.append(True)  # once: the abort that follows goes through here too
            failure(link)

    def send_pdu(primitive: object) -> None:  # pynetdicom's path
        strike()
        queue_pdu(primitive)

    def write_pdu(pdu: bytes) -> bool:  # the sender's own: its command
        strike()
        return write(pdu)

    def write_data(header: bytes, pieces: list[Any]) -> bool:  # and its data set
        strike()
        return write_from_files(header, pieces)

    link.assoc.dul.send_pdu = send_pdu
    writer.write = write_pdu  # type: ignore[method-assign]
    writer.write_from_files = write_data  # type: ignore[method-assign]
    return link, writer, sent_before


def test_a_connection_lost_while_sending_fails_the_store(volume: Path, archive: Storescp) -> None:
    link, writer, sent_before = _sent_once_then_failing(volume, archive, lambda _: archive.stop())
    try:
        with pytest.raises(SendError):
            link.send(volume, *_sop_class_and_syntax(volume))
    finally:
        link.close()
    assert writer.direct == sent_before + 4


def test_a_write_that_fails_aborts_and_the_store_is_retried_once(
    volume: Path, archive: Storescp
) -> None:
    """The socket fails under the sending thread (here: closed for writing):
    the association is aborted at once and the instance is sent again over a
    fresh one."""

    def shut(link: DicomLink) -> None:
        link.assoc.dul.socket.socket.shutdown(socket.SHUT_WR)

    link, first, sent_before = _sent_once_then_failing(volume, archive, shut)
    try:
        assert link.send(volume, *_sop_class_and_syntax(volume)) == 0x0000
        assert link.pdata is not first  # sent again, on a new association
        assert first.direct == sent_before + 4
    finally:
        link.close()
    assert all(_data_set(path) == _data_set(volume) for path in archive.files())


@pytest.mark.skipif(sys.platform != "linux", reason="a nice value per thread is Linux's")
def test_forwarding_threads_run_nicer_than_the_rest() -> None:
    seen: list[tuple[int, int]] = []

    def worker() -> None:
        lower_thread_priority(FORWARD_NICE)
        tid = threading.get_native_id()

        def child() -> None:  # threads a forwarding thread starts (associations, hashing)
            own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            seen.append((os.getpriority(os.PRIO_PROCESS, tid), own))

        thread = threading.Thread(target=child)
        thread.start()
        thread.join()

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    expected = min(base + FORWARD_NICE, 19)
    assert seen == [(expected, expected)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base

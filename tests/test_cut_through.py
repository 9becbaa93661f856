"""Forwarding a large instance while it arrives (``gateway.cut_through``).

The pieces, against pydicom and the engine: where the pixel data element
starts in a file still arriving, how far its bytes are known to belong to it,
and the stand-in header run. Then the node end to end, in-process, with
dcmtk's storescu sending through a slow link (so the instance is still
arriving while it is forwarded) and dcmtk's storescp as the archive: what
the archive gets, what the audit trail records, and that a receipt cut short,
an instance refused at its end, or a full run that writes another header
leave the archive without a partial or wrong instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, generate_uid

from gateway import metrics
from gateway.config import DEFAULT_CONFIG_YAML, parse_config
from gateway.cut_through import PixelScan, locate_pixels
from gateway.deid import Deidentifier, load_key, load_profile
from gateway.deid.report import DeidReport, Outcome
from gateway.deid.stream import _file_meta_end, _pixel_extent
from gateway.node import Node, build_engines
from gateway.receive import STATUS_TOO_LARGE
from gateway.synthetic import PlantedPHI, write_large_volume
from tests.logcapture import captured_logs
from tests.peers import Storescp, free_port, storescu
from tests.reliability import spooled_sha256

VOLUME_BYTES = 24 * 2**20
#: The link's pace: the volume takes about a second to arrive.
LINK_BYTES_PER_SECOND = 24 * 2**20


# ---------------------------------------------------------------- the pieces
@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cut") / "volume.dcm"
    return write_large_volume(path, VOLUME_BYTES, PlantedPHI.create(5))


@pytest.fixture(scope="module")
def native_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Native (defined-length) pixel data in implicit VR and in explicit VR big endian."""
    root = tmp_path_factory.mktemp("native")
    paths = []
    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "CUT^THROUGH"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 64, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.arange(64 * 64, dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = root / f"{syntax.name.replace(' ', '')}.dcm"
        ds.save_as(path, enforce_file_format=True, little_endian=syntax.is_little_endian,
                   implicit_vr=syntax.is_implicit_VR)  # fmt: skip
        paths.append(path)
    return paths


def _pixel_start(path: Path) -> int:
    with path.open("rb") as fp:
        dcmread(fp, stop_before_pixels=True)
        return fp.tell()


def _pixel_end(path: Path) -> int:
    header = dcmread(path, stop_before_pixels=True)
    with path.open("rb") as fp:
        syntax = header.file_meta.TransferSyntaxUID
        end, tag = _pixel_extent(fp, _pixel_start(path), path.stat().st_size, syntax)
    assert tag is not None
    return end


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1))
def test_the_pixel_data_element_is_found_once_its_header_has_arrived(
    volume: Path, native_files: list[Path], cut: float
) -> None:
    for path in [volume, *native_files]:
        start = _pixel_start(path)
        data = path.read_bytes()[: start + 64]
        element = locate_pixels(data)
        assert element is not None and element.start == start
        prefix = data[: int(cut * (start + 12))]
        found = locate_pixels(prefix)
        # found only once the element's own header is there, and then where pydicom says
        assert found is None or (found.start == start and len(prefix) >= start + len(found.header))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.integers(1, 2 * 2**20), min_size=1, max_size=40))
def test_pixel_bytes_are_known_inside_the_element_and_never_past_it(
    volume: Path, native_files: list[Path], steps: list[int]
) -> None:
    for path in [volume, *native_files]:
        data = path.read_bytes()
        element = locate_pixels(data)
        assert element is not None
        end = _pixel_end(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            scan = PixelScan(fd, element)
            size = element.start + len(element.header)
            for step in steps:
                size = min(size + step, len(data))
                inside = scan.inside(size)
                assert element.start < inside <= end
                assert scan.end is None or scan.end == end
            scan.inside(len(data))
            assert scan.end == end
        finally:
            os.close(fd)


def test_the_stand_in_gives_the_header_of_the_full_run(volume: Path, tmp_path: Path, key_file: Path) -> None:
    engine = Deidentifier(load_profile("research"), load_key(key_file))
    data = volume.read_bytes()
    element = locate_pixels(data)
    assert element is not None
    standin = tmp_path / "standin.dcm"
    standin.write_bytes(data[: element.start] + element.stand_in())
    first = engine.deidentify_file(standin, tmp_path / "a.dcm", pixels_by_reference=True)
    full = engine.deidentify_file(volume, tmp_path / "b.dcm", pixels_by_reference=True)
    assert first.outcome is Outcome.PASSED and full.outcome is Outcome.PASSED
    assert first.pixel_reference is not None and full.pixel_reference is not None
    assert first.pixel_reference.start == full.pixel_reference.start == element.start
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


# ---------------------------------------------------------------- the node
class SlowLink:
    """A TCP relay on loopback that passes the sender's bytes at ``rate`` bytes
    a second and, with ``cut_after``, closes both connections once that many
    have passed (a sender that dies mid-instance)."""

    def __init__(self, target: int, rate: int, cut_after: int | None = None) -> None:
        self.port = free_port()
        self._target = target
        self._rate = rate
        self._cut_after = cut_after
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._run(self._accept)

    def _run(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self._target))
                self._sockets += [client, upstream]
                self._run(self._pump, client, upstream, True)
                self._run(self._pump, upstream, client, False)

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        passed = 0
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while chunk := source.recv(256 * 1024):
                sink.sendall(chunk)
                passed += len(chunk)
                if throttled and self._cut_after is not None and passed >= self._cut_after:
                    for sock in (source, sink):
                        sock.shutdown(socket.SHUT_RDWR)  # wakes the other direction's thread
                        sock.close()
                    return
                if throttled:
                    time.sleep(max(0.0, started + passed / self._rate - time.monotonic()))
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # shutdown() wakes a thread blocked on the socket; close() alone does not
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive()



def _config(tmp_path: Path, archive: Storescp, **limits: object) -> Any:
    """The embedded defaults, forwarding to ``archive``; instances over 1 MiB
    are forwarded while they arrive."""
    data = yaml.safe_load(DEFAULT_CONFIG_YAML)
    data["listen"]["port"] = 0
    data["metrics"]["port"] = 0
    data["allowed_callers"][0]["ae_title"] = "SCANNER"
    data["destinations"] = [
        {"name": "archive", "ae_title": archive.ae_title, "host": "127.0.0.1", "port": archive.port}
    ]
    data["forwarding"] = {"cut_through_bytes": "1MiB", "backoff_initial": 0.2, "backoff_max": 0.5}
    data["limits"] = {"max_instance_bytes": "1GiB", **limits}
    return parse_config(data, tmp_path, generate_key=True)


@contextlib.contextmanager
def running(node: Node) -> Iterator[int]:
    port = node.start()[1]
    try:
        yield port
    finally:
        node.stop()


def _counted(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(f"{metrics.NAMESPACE}_cut_through_total", {"outcome": outcome})
    return value or 0.0


def _events(log: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]


def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _data_set(path: Path) -> bytes:
    data = path.read_bytes()
    return data[_file_meta_end(data, 132) :]


#: An identifying value in a private element after the pixel data.
TRAILER_TOKEN = b"TRAILERPHI^SECRET7"


@pytest.fixture(scope="module")
def trailed(volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The volume with a private block after its pixel data, holding a planted value."""
    path = tmp_path_factory.mktemp("trailed") / "trailed.dcm"
    creator = b"ACME TRAILER"
    trailer = struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", len(creator)) + creator
    trailer += struct.pack("<HH2sH", 0x7FE1, 0x1001, b"LO", len(TRAILER_TOKEN)) + TRAILER_TOKEN
    path.write_bytes(volume.read_bytes() + trailer)
    assert dcmread(path)[0x7FE11001].value == TRAILER_TOKEN.decode()
    return path


@pytest.mark.integration
@pytest.mark.parametrize("which", ["volume", "trailed"])
def test_a_large_instance_is_forwarded_while_it_arrives(
    which: str, request: pytest.FixtureRequest, tmp_path: Path, archive: Storescp
) -> None:
    source: Path = request.getfixturevalue(which)
    config = _config(tmp_path, archive)
    node = Node(config)
    before = _counted("forwarded")
    with captured_logs(json=True) as log, running(node) as port:
        link = SlowLink(port, LINK_BYTES_PER_SECOND)
        try:
            result = storescu(link.port, [source])
        finally:
            link.close()
        assert result.returncode == 0, result.stderr
        _wait(lambda: len(archive.files()) == 1 and node.idle())
        assert node.audit is not None
        records = node.audit.records()
    assert _counted("forwarded") == before + 1
    events = _events(log)
    ahead = [e["size_bytes"] for e in events if e["event"] == "cut-through.forwarded"]
    # the archive had most of the pixel data before the instance was acknowledged
    assert len(ahead) == 1 and ahead[0] > VOLUME_BYTES // 2
    assert not [e for e in events if e["event"] in ("cut-through.abandoned", "cut-through.declined")]
    expected = tmp_path / "expected.dcm"
    engine = Deidentifier(load_profile("research"), load_key(config.key_file))
    report = engine.deidentify_file(source, expected)
    assert report.outcome is Outcome.PASSED
    assert _data_set(archive.files()[0]) == _data_set(expected)
    assert TRAILER_TOKEN not in archive.files()[0].read_bytes()
    forwarded = [r for r in records if r["outcome"] == "forwarded"]
    assert len(forwarded) == 1 and forwarded[0]["input_sha256"] == spooled_sha256(source)


@pytest.mark.integration
def test_a_receipt_cut_short_leaves_nothing_in_the_archive(
    volume: Path, tmp_path: Path, archive: Storescp
) -> None:
    node = Node(_config(tmp_path, archive))
    before = _counted("abandoned")
    with running(node) as port:
        link = SlowLink(port, LINK_BYTES_PER_SECOND, cut_after=VOLUME_BYTES * 2 // 3)
        try:
            result = storescu(link.port, [volume])
        finally:
            link.close()
        assert result.returncode != 0
        _wait(lambda: _counted("abandoned") == before + 1)
        time.sleep(1.0)
        assert archive.files() == []
        assert node.idle()
        assert node.audit is not None and node.audit.records() == []
        # the archive's association was aborted, not left waiting: the next instance goes through
        assert storescu(port, [volume]).returncode == 0
        _wait(lambda: len(archive.files()) == 1 and node.idle())


@pytest.mark.integration
def test_an_instance_refused_at_its_end_leaves_nothing_in_the_archive(
    volume: Path, tmp_path: Path, archive: Storescp
) -> None:
    node = Node(_config(tmp_path, archive, max_instance_bytes=VOLUME_BYTES // 2))
    before = _counted("abandoned")
    with captured_logs(json=True) as log, running(node) as port:
        link = SlowLink(port, LINK_BYTES_PER_SECOND)
        try:
            storescu(link.port, [volume])
        finally:
            link.close()
        _wait(lambda: _counted("abandoned") == before + 1)
        refused = [e for e in _events(log) if e["event"] == "instance.refused"]
        assert [(e["reason"], e["status"]) for e in refused] == [("instance-too-large", STATUS_TOO_LARGE)]
        time.sleep(1.0)
        assert archive.files() == []
        assert node.audit is not None and node.audit.records() == []


class _Drifting(Deidentifier):
    """An engine whose every run writes another Series Description: the full
    run after the receipt never agrees with the header sent ahead."""

    runs = 0

    def deidentify(self, dataset: Dataset, **kwargs: Any) -> DeidReport:
        report = super().deidentify(dataset, **kwargs)
        type(self).runs += 1
        dataset.SeriesDescription = f"RUN {self.runs}"
        return report


@pytest.mark.integration
def test_a_full_run_that_writes_another_header_sends_the_instance_whole(
    volume: Path, tmp_path: Path, archive: Storescp
) -> None:
    config = _config(tmp_path, archive)
    build_engines(config)  # makes the key
    engine = _Drifting(load_profile("research"), load_key(config.key_file))
    engine.memo = None  # every run a full one
    node = Node(config, engines={config.routes[0].name: engine})
    before = _counted("abandoned")
    with captured_logs(json=True) as log, running(node) as port:
        link = SlowLink(port, LINK_BYTES_PER_SECOND)
        try:
            assert storescu(link.port, [volume]).returncode == 0
        finally:
            link.close()
        _wait(lambda: len(archive.files()) == 1 and node.idle())
    assert _counted("abandoned") == before + 1
    reasons = [e.get("reason") for e in _events(log) if e["event"] == "cut-through.abandoned"]
    assert reasons == ["output-differs"]
    stored = dcmread(archive.files()[0])
    # the archive holds the instance of the last run, whole
    assert stored.SeriesDescription == f"RUN {_Drifting.runs}" and _Drifting.runs >= 2
    assert stored.PixelData == dcmread(volume).PixelData

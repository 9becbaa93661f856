"""The node in-process: refusals at the edge, folder archive, embedded defaults."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pynetdicom import AE

from gateway import forward, metrics
from gateway.audit import sha256_file
from gateway.config import DEFAULT_CONFIG_YAML, parse_config
from gateway.node import Node
from gateway.receive import STATUS_NOT_AUTHORIZED, STATUS_OUT_OF_RESOURCES, STATUS_TOO_LARGE
from gateway.synthetic import PlantedPHI, write_secondary_capture, write_slide, write_sr
from tests.logcapture import captured_logs
from tests.reliability import spooled_sha256

SR = "1.2.840.10008.5.1.4.1.1.88.33"
SC = "1.2.840.10008.5.1.4.1.1.7"


def send(port: int, path: Path, calling: str = "SCANNER") -> tuple[bool, int | None]:
    """C-STORE one file; (association accepted, status or None)."""
    ds = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DEID_GATEWAY")
    if not assoc.is_established:
        return False, None
    status = assoc.send_c_store(path)
    assoc.release()
    return True, int(status.Status) if "Status" in status else None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edge")
    phi = PlantedPHI.create(3)
    slide = write_slide(root / "slide", phi, slide_number=1)
    return {
        "sr": write_sr(root / "sr.dcm", phi, slide[0]),
        "sc": write_secondary_capture(root / "sc.dcm", phi, False),
    }


def _node(
    tmp_path: Path, limits: dict[str, object], forwarding: dict[str, object] | None = None
) -> Node:
    """The embedded defaults, on a free port, with ``limits``, ``forwarding``
    settings and one route for SR and secondary capture."""
    data = yaml.safe_load(DEFAULT_CONFIG_YAML)
    data["listen"]["port"] = 0
    data["metrics"]["port"] = 0
    data["allowed_callers"][0]["ae_title"] = "SCANNER"
    data["limits"] = limits
    if forwarding is not None:
        data["forwarding"] = forwarding
    data["routes"] = [{"calling_ae_title": "SCANNER", "sop_classes": [SR, SC]}]
    return Node(parse_config(data, tmp_path, generate_key=True))


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    """A node refusing instances over 100 kB."""
    monkeypatch.chdir(tmp_path)
    running = _node(tmp_path, {"max_instance_bytes": 100_000})
    running.start()
    yield running
    running.stop()


def wait_idle(node: Node, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not node.idle():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_defaults_generate_a_private_key_and_archive_to_a_folder(
    node: Node, files: dict[str, Path], tmp_path: Path
) -> None:
    key = tmp_path / "gateway-data" / "gateway.key"
    assert key.is_file()
    assert key.stat().st_mode & 0o777 == 0o600
    assert node.address is not None
    assert send(node.address[1], files["sr"]) == (True, 0)
    wait_idle(node)
    archived = list((tmp_path / "gateway-data" / "archive").rglob("*.dcm"))
    assert len(archived) == 1
    ds = dcmread(archived[0])
    study, series, name = archived[0].relative_to(tmp_path / "gateway-data" / "archive").parts
    assert (study, series, name) == (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                     f"{ds.SOPInstanceUID}.dcm")
    assert ds.SOPInstanceUID != dcmread(files["sr"]).SOPInstanceUID


def test_edge_refusals_leave_nothing_behind(node: Node, files: dict[str, Path]) -> None:
    assert node.address is not None
    port = node.address[1]
    assert files["sc"].stat().st_size > 100_000
    assert send(port, files["sc"]) == (True, STATUS_TOO_LARGE)
    assert send(port, files["sr"], calling="INTRUDER") == (False, None)
    assert node.idle()
    assert list(node.spool.incoming.iterdir()) == []


def test_a_spool_below_its_floor_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    floored = _node(tmp_path, {"min_free_bytes": "1000TiB"})
    floored.start()
    try:
        assert floored.address is not None
        assert send(floored.address[1], files["sr"]) == (True, STATUS_OUT_OF_RESOURCES)
        assert floored.idle()
        assert list(floored.spool.incoming.iterdir()) == []
    finally:
        floored.stop()


def test_no_route_is_not_authorized(node: Node, files: dict[str, Path]) -> None:
    slide = sorted((files["sr"].parent / "slide").glob("level*.dcm"))[-1]
    assert node.address is not None
    assert send(node.address[1], slide) == (True, STATUS_NOT_AUTHORIZED)
    assert node.idle()


def test_a_receiving_process_that_dies_is_started_again_on_the_same_port(
    node: Node, files: dict[str, Path]
) -> None:
    assert node.receiver is not None and node.address is not None
    first = node.receiver.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while node.receiver.pid == first or not node.receiver.listening:
        assert time.monotonic() < deadline, "the receiving process was not started again"
        time.sleep(0.05)
    assert send(node.address[1], files["sr"]) == (True, 0)
    wait_idle(node)
    assert len(list((Path.cwd() / "gateway-data" / "archive").rglob("*.dcm"))) == 1


def test_the_receiving_process_has_process_metrics_of_its_own(node: Node) -> None:
    assert node.receiver is not None and node.receiver.pid is not None
    rss = metrics.REGISTRY.get_sample_value("deid_gateway_receiver_process_resident_memory_bytes")
    assert rss is not None and rss > 20e6
    own_start = metrics.REGISTRY.get_sample_value("process_start_time_seconds")
    start = metrics.REGISTRY.get_sample_value("deid_gateway_receiver_process_start_time_seconds")
    assert own_start is not None and start is not None and start >= own_start


def test_the_input_is_hashed_after_delivery_and_an_unreadable_one_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    """The archive does not wait for the audit record's hash of the input; a
    delivered input that cannot then be read keeps its entry until its record
    can be written, and is neither quarantined nor left unrecorded."""
    monkeypatch.chdir(tmp_path)
    archive = tmp_path / "gateway-data" / "archive"
    archived_when_hashed: list[int] = []

    def flaky_sha256(path: Path) -> str:
        archived_when_hashed.append(len(list(archive.rglob("*.dcm"))))
        if len(archived_when_hashed) == 1:
            raise OSError(5, "Input/output error")
        return sha256_file(path)

    monkeypatch.setattr(forward, "sha256_file", flaky_sha256)
    node = _node(tmp_path, {}, forwarding={"backoff_max": 0.2})
    with captured_logs(json=True) as log:
        node.start()
        try:
            assert node.address is not None
            assert send(node.address[1], files["sr"]) == (True, 0)
            wait_idle(node)
            assert node.audit is not None
            records = node.audit.records()
        finally:
            node.stop()
    assert archived_when_hashed == [1, 1]
    assert len(list(archive.rglob("*.dcm"))) == 1
    assert [(r["outcome"], r["input_sha256"]) for r in records] == [
        ("forwarded", spooled_sha256(files["sr"]))
    ]
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    unreadable = [e for e in events if e["event"] == "forward.input-unreadable"]
    assert [(e["reason"], e["outcome"], e["error_type"]) for e in unreadable] == [
        ("input-unreadable", "retrying", "OSError")
    ]
    assert not node.quarantine.entries()

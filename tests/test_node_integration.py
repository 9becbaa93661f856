"""The node end to end, with real peers: dcmtk storescu sends a synthetic study to
``deid-gateway serve``, which forwards to dcmtk storescp and to Orthanc."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from gateway.deid import Deidentifier, Outcome, generate_key_file, load_key, load_profile
from gateway.synthetic import PlantedPHI, write_study
from tests.peers import Gateway, Orthanc, Storescp, free_port, storescu

pytestmark = pytest.mark.integration


@dataclass
class Corpus:
    phi: PlantedPHI
    files: list[Path]
    key_file: Path
    #: new SOP Instance UID -> original file, for every instance that must arrive
    expected: dict[str, Path]
    original_uids: set[str]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    phi = PlantedPHI.create(7)
    study = write_study(root / "study", phi, slides=2)
    key_file = root / "gateway.key"
    generate_key_file(key_file)
    deid = Deidentifier(load_profile("research"), load_key(key_file))
    expected: dict[str, Path] = {}
    original_uids: set[str] = set()
    for path in study.all_files():
        ds = dcmread(path, stop_before_pixels=True)
        original_uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        report = deid.deidentify_file(path, root / "check.dcm")
        if report.outcome is Outcome.PASSED:
            assert report.new_sop_instance_uid is not None
            expected[report.new_sop_instance_uid] = path
    assert 0 < len(expected) < len(study.all_files())
    return Corpus(phi, study.all_files(), key_file, expected, original_uids)


def gateway_config(corpus: Corpus, destinations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "allowed_callers": [{"ae_title": "SCANNER", "hosts": ["127.0.0.1"]}],
        "spool_dir": "spool",
        "quarantine_dir": "quarantine",
        "key_file": str(corpus.key_file),
        "profile": "research",
        "destinations": destinations,
        "forwarding": {"workers": 2, "max_attempts": 200, "backoff_initial": 0.2,
                       "backoff_max": 1.0},
    }


def dicom_dest(name: str, peer: Storescp | Orthanc) -> dict[str, Any]:
    return {"name": name, "ae_title": peer.ae_title, "host": "127.0.0.1", "port": peer.port}


def wait_until(condition: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.2)


def spool_empty(gateway: Gateway) -> bool:
    ready = gateway.directory / "spool" / "ready"
    return ready.is_dir() and not any(ready.iterdir())


def check_archive(files: list[Path], corpus: Corpus) -> None:
    """Exactly the expected instances, de-identified, one study, tiles unchanged."""
    tokens = [t.encode() for t in corpus.phi.all_tokens()]
    originals = [uid.encode() for uid in corpus.original_uids]
    by_uid = {}
    for path in files:
        data = path.read_bytes()
        assert not [t for t in tokens if t in data], path.name
        assert not [u for u in originals if u in data], path.name
        ds = dcmread(path)
        assert "LABEL" not in ds.get("ImageType", [])
        assert "OVERVIEW" not in ds.get("ImageType", [])
        by_uid[str(ds.SOPInstanceUID)] = ds
    assert set(by_uid) == set(corpus.expected)
    assert len({str(ds.StudyInstanceUID) for ds in by_uid.values()}) == 1
    for uid, ds in by_uid.items():
        original = dcmread(corpus.expected[uid])
        assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        if "PixelData" in original:
            assert ds.PixelData == original.PixelData
    # instances of one original series stay together in one new series
    series: dict[str, set[str]] = {}
    for uid, ds in by_uid.items():
        original_series = str(dcmread(corpus.expected[uid], stop_before_pixels=True)
                              .SeriesInstanceUID)
        series.setdefault(original_series, set()).add(str(ds.SeriesInstanceUID))
    assert all(len(new) == 1 for new in series.values())
    assert len({next(iter(new)) for new in series.values()}) == len(series)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Storescp, Orthanc]]:
    storescp = Storescp(tmp_path / "storescp").start()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        yield storescp, orthanc
    finally:
        storescp.stop()
        orthanc.stop()


def test_study_reaches_both_archives_deidentified(
    tmp_path: Path, corpus: Corpus, peers: tuple[Storescp, Orthanc]
) -> None:
    storescp, orthanc = peers
    gateway = Gateway(tmp_path / "gw", gateway_config(corpus, [
        dicom_dest("archive", storescp), dicom_dest("orthanc", orthanc),
    ])).start()
    try:
        sent = storescu(gateway.port, corpus.files)
        assert sent.returncode == 0, sent.stderr
        intruder = storescu(gateway.port, corpus.files[:1], calling="INTRUDER")
        assert intruder.returncode != 0
        assert "Rejected" in intruder.stderr + intruder.stdout
        wait_until(lambda: spool_empty(gateway) and len(storescp.files()) >= len(corpus.expected))
        check_archive(storescp.files(), corpus)
        assert len(orthanc.get("/instances")) == len(corpus.expected)
        orthanc_files = []
        for index, instance in enumerate(orthanc.get("/instances")):
            path = tmp_path / f"orthanc-{index}.dcm"
            path.write_bytes(orthanc.get_bytes(f"/instances/{instance}/file"))
            orthanc_files.append(path)
        check_archive(orthanc_files, corpus)
        held = subprocess.run(
            [sys.executable, "-m", "gateway", "quarantine", "--config",
             str(gateway.directory / "gateway.yaml"), "list"],
            capture_output=True, text=True, check=True, cwd=gateway.directory,
        ).stdout.splitlines()
        assert len(held) == 2  # Secondary Captures with burned-in text or no flag
        assert all("burned-in-annotation" in line for line in held)
    finally:
        gateway.stop()
    log = gateway.log.read_text()
    assert "instance.delivered" in log
    assert not [t for t in corpus.phi.all_tokens() if t in log]
    assert not [u for u in corpus.original_uids if u in log]


def test_archive_down_during_send_then_everything_arrives(
    tmp_path: Path, corpus: Corpus
) -> None:
    storescp = Storescp(tmp_path / "storescp", port=free_port())
    gateway = Gateway(tmp_path / "gw", gateway_config(corpus, [dicom_dest("archive", storescp)]))
    gateway.start()
    try:
        sent = storescu(gateway.port, corpus.files)
        assert sent.returncode == 0, sent.stderr
        time.sleep(1.0)
        assert not spool_empty(gateway)
        storescp.start()
        wait_until(lambda: spool_empty(gateway))
        check_archive(storescp.files(), corpus)
    finally:
        gateway.stop()
        storescp.stop()


def test_kill_9_during_send_loses_nothing_acknowledged(tmp_path: Path, corpus: Corpus) -> None:
    storescp = Storescp(tmp_path / "storescp").start()
    gateway = Gateway(tmp_path / "gw", gateway_config(corpus, [dicom_dest("archive", storescp)]))
    gateway.start()
    acknowledged: list[Path] = []
    try:
        proc = subprocess.Popen(
            ["/usr/bin/storescu", "-v", "-aet", "SCANNER", "-aec", "DEID_GATEWAY", "-R", "-xy",
             "-nh", "127.0.0.1", str(gateway.port), *map(str, corpus.files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin"},
        )
        assert proc.stdout is not None
        current: Path | None = None
        killed = threading.Event()
        for line in proc.stdout:
            if "Sending file:" in line:
                current = Path(line.split("Sending file:", 1)[1].strip())
            elif "Received Store Response (Success)" in line and current is not None:
                acknowledged.append(current)
                if len(acknowledged) == 6 and not killed.is_set():
                    gateway.kill()
                    killed.set()
        proc.wait(timeout=60)
        assert killed.is_set()
        assert 6 <= len(acknowledged) < len(corpus.files)
        gateway.start()
        wait_until(lambda: spool_empty(gateway))
        gateway.stop()
        received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in storescp.files()}
        must_have = {uid for uid, path in corpus.expected.items() if path in acknowledged}
        assert must_have
        assert must_have <= received
        assert received <= set(corpus.expected)
    finally:
        gateway.stop()
        storescp.stop()

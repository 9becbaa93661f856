"""Shared pieces of the reliability tests: small instances, a persistent sender,
the archive's view of what arrived, and the gateway's metrics and readiness.

Instances are copies of one synthetic Comprehensive SR (about 4 KB) with a
fresh SOP Instance UID each, so hundreds cost a fraction of a second to write
and a few milliseconds each to de-identify. What the archive should hold is
computed with the same engine and key the gateway uses: its UIDs are keyed
functions of the originals, so the expected output UIDs are known in advance.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.deid.stream import _file_meta_end
from gateway.dimse import file_meta
from gateway.synthetic import PlantedPHI, write_sr

CALLING = "SCANNER"
CALLED = "DEID_GATEWAY"
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"


def make_instances(directory: Path, count: int, phi: PlantedPHI) -> list[Path]:
    """``count`` SR instances full of ``phi``'s planted values, each with its own UID."""
    directory.mkdir(parents=True, exist_ok=True)
    ref = Dataset()
    ref.SOPClassUID = WSI
    ref.SOPInstanceUID = phi.uid("reliability/slide")
    ref.SeriesInstanceUID = phi.uid("reliability/series")
    ref.StudyInstanceUID = phi.uid("reliability/study")
    ref.file_meta = FileMetaDataset()
    ref.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ref.file_meta.MediaStorageSOPClassUID = UID(WSI)
    ref.file_meta.MediaStorageSOPInstanceUID = ref.SOPInstanceUID
    ref.save_as(directory / "reference.dcm", enforce_file_format=True)
    template = dcmread(write_sr(directory / "template.dcm", phi, directory / "reference.dcm"))
    paths = []
    for index in range(count):
        uid = generate_uid()
        template.SOPInstanceUID = uid
        template.file_meta.MediaStorageSOPInstanceUID = uid
        path = directory / f"sr-{index:04d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    (directory / "reference.dcm").unlink()
    (directory / "template.dcm").unlink()
    return paths


def expected_uids(paths: Iterable[Path], key: SecretKey, scratch: Path) -> dict[Path, str]:
    """The SOP Instance UID the gateway's engine gives each input."""
    deid = Deidentifier(load_profile("research"), key)
    result = {}
    for path in paths:
        report = deid.deidentify_file(path, scratch)
        assert report.outcome is Outcome.PASSED, report.reason
        assert report.new_sop_instance_uid is not None
        result[path] = report.new_sop_instance_uid
        scratch.unlink()
    return result


def archived(directories: Iterable[Path]) -> list[tuple[str, bytes]]:
    """(SOP Instance UID, content) of every DICOM file under ``directories``.

    Hidden files and directories (a folder destination's ``.partial/`` for
    writes in progress) are not archived instances and are left out;
    :func:`hidden_files` lists them.
    """
    found = []
    for directory in directories:
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not _hidden(path, directory):
                found.append((str(dcmread(path, stop_before_pixels=True).SOPInstanceUID),
                              path.read_bytes()))
    return found


def spooled_sha256(path: Path) -> str:
    """The SHA-256 of the file ``path`` as the receiver spools it when it is
    sent (the audit records' ``input_sha256``): the File Meta built from the
    C-STORE request, then the data set as sent."""
    data = path.read_bytes()
    meta = dcmread(path, stop_before_pixels=True).file_meta
    head = file_meta(str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                     str(meta.TransferSyntaxUID))  # fmt: skip
    return hashlib.sha256(head + data[_file_meta_end(data, 132) :]).hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def hidden_files(directory: Path) -> list[Path]:
    """Files under ``directory`` with a hidden name or in a hidden directory."""
    return [p for p in directory.rglob("*") if p.is_file() and _hidden(p, directory)]


def send_one(port: int, path: Path, calling: str = CALLING, timeout: float = 30) -> int | None:
    """C-STORE one file on its own association; the status, or None without one."""
    meta = read_file_meta_info(path)  # only the File Meta: the data set may be malformed
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if "Status" in status else None


@dataclass
class Sender:
    """A scanner that keeps sending until every instance was answered Success.

    It opens an association, sends what is still unacknowledged, and on any
    failure (refused, aborted, no response) waits briefly and starts again,
    as a modality's send queue does. ``acked`` holds the files answered
    Success; ``attempts`` counts C-STORE requests, retries included.
    """

    port: int
    files: list[Path]
    per_association: int = 20
    acked: set[Path] = field(default_factory=set)
    attempts: int = 0
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sender:
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "sender did not stop"

    def wait_done(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.acked) < len(self.files):
            time.sleep(0.1)
        return len(self.acked) == len(self.files)

    def _run(self) -> None:
        ds = dcmread(self.files[0], stop_before_pixels=True)
        ae = AE(ae_title=CALLING)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        while not self._stop.is_set():
            todo = [p for p in self.files if p not in self.acked][: self.per_association]
            if not todo:
                self._stop.wait(0.1)
                continue
            assoc = ae.associate("127.0.0.1", self.port, ae_title=CALLED)
            if not assoc.is_established:
                self.failures += 1
                self._stop.wait(0.05)
                continue
            for path in todo:
                if self._stop.is_set():
                    break
                self.attempts += 1
                status = assoc.send_c_store(path)
                if "Status" in status and int(status.Status) == 0:
                    self.acked.add(path)
                    continue
                self.failures += 1
                break
            if assoc.is_established:
                assoc.release()


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """(HTTP status, body) of a GET; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def metric(base_url: str, name: str) -> float | None:
    """The value of an unlabelled sample in ``/metrics``, or None when absent."""
    _, body = http_get(f"{base_url}/metrics")
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


def readiness(base_url: str) -> tuple[int, Any]:
    status, body = http_get(f"{base_url}/readyz")
    return status, json.loads(body)


def wait_until(condition: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def gateway_config(spool: Path, key_file: Path, destinations: list[dict[str, Any]],
                   **extra: Any) -> dict[str, Any]:
    """A node configuration for the tests: SCANNER from 127.0.0.1, research profile."""
    return {
        "allowed_callers": [{"ae_title": CALLING, "hosts": ["127.0.0.1"]}],
        "spool_dir": str(spool / "spool"),
        "quarantine_dir": str(spool / "quarantine"),
        "key_file": str(key_file),
        "profile": "research",
        "destinations": destinations,
        "limits": {"min_free_bytes": 0},
        "forwarding": {"workers": 2, "max_attempts": 1000, "backoff_initial": 0.1,
                       "backoff_max": 0.5},
        **extra,
    }

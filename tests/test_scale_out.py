"""Scale-out without coordination: two gateway processes, one study, one archive.

Two ``deid-gateway serve`` processes with separate spools share only the key
file and the profile. Half of one synthetic study goes to each (interleaved,
so every slide's pyramid is split between them) and both forward to one dcmtk
storescp. The archive must hold one consistent study, exactly what one engine
produces for the whole study.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from gateway.deid import Deidentifier, Outcome, load_key, load_profile
from gateway.quarantine import Quarantine
from gateway.synthetic import SyntheticStudy
from tests.peers import Gateway, Storescp, storescu

pytestmark = pytest.mark.integration


def _config(key_file: Path, archive: Storescp) -> dict[str, Any]:
    return {
        "allowed_callers": [{"ae_title": "SCANNER", "hosts": ["127.0.0.1"]}],
        "spool_dir": "spool",
        "quarantine_dir": "quarantine",
        "key_file": str(key_file),
        "profile": "research",
        "destinations": [
            {"name": "archive", "ae_title": archive.ae_title, "host": "127.0.0.1", "port": archive.port}
        ],
        "forwarding": {"workers": 2, "max_attempts": 100, "backoff_initial": 0.2, "backoff_max": 1.0},
    }



def _referenced_uids(ds: Dataset) -> Iterator[str]:
    """Every Referenced SOP Instance UID at any depth."""
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID":
            yield str(elem.value)


def _days(value: str) -> dt.date:
    return dt.datetime.strptime(value[:8], "%Y%m%d").date()


def test_two_replicas_give_one_consistent_study(
    tmp_path: Path, archive: Storescp, key_file: Path, synthetic_study: SyntheticStudy
) -> None:
    files = synthetic_study.all_files()
    halves = (files[0::2], files[1::2])
    deid = Deidentifier(load_profile("research"), load_key(key_file))
    expected: dict[str, Path] = {}
    quarantined = 0
    for index, path in enumerate(files):
        report = deid.deidentify_file(path, tmp_path / f"expected-{index}.dcm")
        if report.outcome is Outcome.PASSED:
            assert report.new_sop_instance_uid is not None
            expected[report.new_sop_instance_uid] = path
        quarantined += report.outcome is Outcome.QUARANTINED
    originals = {path: dcmread(path, stop_before_pixels=True) for path in files}
    study_uids = {deid.uids.remap(str(ds.SOPInstanceUID)) for ds in originals.values()}

    gateways = [Gateway(tmp_path / f"gateway-{n}", _config(key_file, archive)) for n in (1, 2)]
    try:
        for gateway in gateways:
            gateway.start()
        for gateway, half in zip(gateways, halves, strict=True):
            result = storescu(gateway.port, half)
            assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 60
        while len(archive.files()) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.2)
        for gateway in gateways:
            ready = gateway.directory / "spool" / "ready"
            while any(ready.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not any(ready.iterdir()), "the spool drained"
    finally:
        for gateway in gateways:
            gateway.stop()
    for gateway in gateways:
        assert gateway.proc is not None and gateway.proc.returncode == 0

    held = sum(len(Quarantine(g.directory / "quarantine").ids()) for g in gateways)
    assert held == quarantined > 0
    stored = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, archive.files())}
    assert set(stored) == set(expected), "each replica forwards what one engine would"

    # One study, one subject, one date offset.
    assert len({str(ds.StudyInstanceUID) for ds in stored.values()}) == 1
    assert len({(str(ds.PatientID), str(ds.PatientName)) for ds in stored.values()}) == 1
    offsets = {
        _days(str(ds.StudyDate)) - _days(str(originals[expected[uid]].StudyDate))
        for uid, ds in stored.items()
    }
    assert len(offsets) == 1
    (offset,) = offsets
    assert dt.timedelta(days=-3650) <= offset <= dt.timedelta(days=-365)

    # Per slide: one series, frame of reference, pyramid and slide pseudonym,
    # although its instances came through both replicas; no two slides share them.
    per_slide: list[tuple[str, ...]] = []
    for slide_files in synthetic_study.slides:
        arrived = [ds for uid, ds in stored.items() if expected[uid] in slide_files]
        senders = {0 if expected[str(ds.SOPInstanceUID)] in halves[0] else 1 for ds in arrived}
        assert senders == {0, 1}, "the slide was split between the replicas"
        keys = {
            (str(ds.SeriesInstanceUID), str(ds.FrameOfReferenceUID), str(ds.PyramidUID),
             str(ds.ContainerIdentifier))
            for ds in arrived
        }  # fmt: skip
        assert len(keys) == 1
        per_slide.append(keys.pop())
    for position in range(4):
        assert len({key[position] for key in per_slide}) == len(per_slide)

    # Every reference points into the de-identified study; references between
    # forwarded instances resolve in the archive whichever replica sent them.
    resolved = 0
    for ds in stored.values():
        for ref in _referenced_uids(ds):
            assert ref in study_uids
            resolved += ref in stored
    assert resolved > 0

"""Overload: more concurrent associations than allowed, and a disk that fills up."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu_primitives import A_ASSOCIATE

from gateway.deid import SecretKey
from gateway.receive import STATUS_OUT_OF_RESOURCES
from gateway.synthetic import PlantedPHI, write_secondary_capture
from tests.peers import DCMTK_ENV, STORESCP, Gateway, free_port, stop, wait_for_port
from tests.reliability import (
    CALLED,
    CALLING,
    archived,
    expected_uids,
    gateway_config,
    make_instances,
    send_one,
    wait_until,
)

CALLERS = 20
PER_CALLER = 10
LIMIT = 5


def _outcome(assoc: Any) -> str:
    """How a caller's association request ended: accepted, rejected, or
    (for the failure message) how else.

    pynetdicom's requestor looks at its connection only after its DUL thread
    has had the chance to run the whole exchange: when the gateway's
    A-ASSOCIATE-RJ came and the connection was closed before the requesting
    thread got to look (20 callers on 2 cores), it aborts without reading the
    rejection, which is still in its queue. That is a rejection all the same.
    """
    if assoc.is_established:
        return "accepted"
    if assoc.is_rejected:
        return "rejected"
    queued = list(assoc.dul.to_user_queue.queue)
    if any(isinstance(item, A_ASSOCIATE) and item.result in (0x01, 0x02) for item in queued):
        return "rejected"
    return f"other (aborted={assoc.is_aborted}, dul={assoc.dul.state_machine.current_state})"


@pytest.mark.integration
def test_twenty_concurrent_callers_past_the_limit_are_rejected_cleanly(
    tmp_path: Path, key: SecretKey, key_file: Path
) -> None:
    """All 20 ask at once; those past ``max_associations`` get A-ASSOCIATE-RJ and retry."""
    files = make_instances(tmp_path / "in", CALLERS * PER_CALLER, PlantedPHI.create(73))
    expected = set(expected_uids(files, key, tmp_path / "scratch.dcm").values())
    folder = tmp_path / "archive"
    gateway = Gateway(tmp_path / "gw", gateway_config(
        tmp_path / "gw", key_file, [{"name": "folder", "folder": str(folder)}],
        limits={"max_associations": LIMIT, "min_free_bytes": 0},
    ))
    first_round: list[str] = []
    acked: list[Path] = []
    lock = threading.Lock()
    everyone_asked = threading.Barrier(CALLERS, timeout=30)

    def caller(mine: list[Path]) -> None:
        ae = AE(ae_title=CALLING)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(dcmread(mine[0]).SOPClassUID, ExplicitVRLittleEndian)
        deadline = time.monotonic() + 60
        first = True
        while mine and time.monotonic() < deadline:
            assoc = ae.associate("127.0.0.1", gateway.port, ae_title=CALLED)
            if first:
                with lock:
                    first_round.append(_outcome(assoc))
                # Hold the association until every caller has asked.
                everyone_asked.wait()
                first = False
            if not assoc.is_established:
                time.sleep(0.1)
                continue
            while mine:
                status = assoc.send_c_store(mine[0])
                if "Status" not in status or int(status.Status) != 0:
                    break
                with lock:
                    acked.append(mine.pop(0))
            if assoc.is_established:
                assoc.release()

    threads = [
        threading.Thread(target=caller, args=(files[i::CALLERS],), daemon=True)
        for i in range(CALLERS)
    ]
    try:
        gateway.start()
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        elapsed = time.monotonic() - started
        assert gateway.proc is not None and gateway.proc.poll() is None, "the gateway died"
        assert not any(thread.is_alive() for thread in threads)
        assert len(first_round) == CALLERS
        # pynetdicom counts associations still negotiating, so at most LIMIT get in.
        assert 1 <= first_round.count("accepted") <= LIMIT, first_round
        assert first_round.count("rejected") == CALLERS - first_round.count("accepted"), first_round
        assert len(acked) == len(files)
        assert wait_until(lambda: len(archived([folder])) == len(files), 60)
        log = gateway.log.read_text()
        assert '"too-many-associations"' in log
        gateway.stop()
        assert gateway.proc.returncode == 0
    finally:
        gateway.stop()
    assert {uid for uid, _ in archived([folder])} == expected
    print(f"{CALLERS} callers at once, limit {LIMIT}: {first_round.count('accepted')} accepted, "
          f"{first_round.count('rejected')} rejected first; {len(files)} instances in {elapsed:.1f} s")


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (needs root and mount rights)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(path)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the free-space floor is tested in "
                    "test_node_edges and test_free_space_floor_refuses_with_a700")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def check_spool(spool: Path) -> int:
    """Every ready entry is whole (instance readable, JSON parseable); return their number."""
    entries = list((spool / "ready").iterdir())
    for entry in entries:
        dcmread(entry / "instance.dcm", stop_before_pixels=True)
        json.loads((entry / "entry.json").read_text())
        if (entry / "state.json").exists():
            json.loads((entry / "state.json").read_text())
    assert [p.name for p in (spool / "incoming").iterdir()] == []
    return len(entries)


@pytest.mark.integration
def test_full_disk_refuses_with_a700_and_keeps_the_spool_whole(
    tmp_path: Path, key_file: Path
) -> None:
    """The spool on a 6 MiB tmpfs, the archive down, 1 MB instances until the disk is full."""
    phi = PlantedPHI.create(74)
    template = dcmread(write_secondary_capture(tmp_path / "sc.dcm", phi, False))
    files = []
    for index in range(12):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(tmp_path / f"sc-{index}.dcm")
        template.save_as(files[-1], enforce_file_format=True)
    scp_port = free_port()
    with small_disk(tmp_path / "disk", "6m") as disk:
        gateway = Gateway(tmp_path / "gw", gateway_config(
            disk, key_file,
            [{"name": "pacs", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": scp_port}],
            quarantine_dir=str(tmp_path / "quarantine"),
            forwarding={"workers": 1, "max_attempts": 1000, "backoff_initial": 0.5,
                        "backoff_max": 1.0},
        ))
        scp: subprocess.Popen[bytes] | None = None
        try:
            gateway.start()
            statuses = [send_one(gateway.port, path) for path in files]
            assert gateway.proc is not None and gateway.proc.poll() is None, "the gateway died"
            acked = [path for path, status in zip(files, statuses, strict=True) if status == 0]
            refused = [p for p, status in zip(files, statuses, strict=True) if status != 0]
            # Once the disk is full, an instance may still fit now and then: the
            # forwarder's scratch copy of an instance it tries to send comes and goes.
            assert acked and refused, statuses
            assert set(statuses) <= {0, STATUS_OUT_OF_RESOURCES}, statuses
            assert check_spool(disk / "spool") == len(acked)
            # The receiving process's log events reach the log through the main
            # process, a moment after the status they explain.
            assert wait_until(lambda: '"spool-full"' in gateway.log.read_text() or (
                '"spool-write-failed"' in gateway.log.read_text()
            ), 10)
            (tmp_path / "scp").mkdir()
            scp = subprocess.Popen(
                [STORESCP, "-aet", "ARCHIVE", "-od", str(tmp_path / "scp"), str(scp_port)],
                env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            wait_for_port(scp_port, scp)
            assert wait_until(lambda: len(list((disk / "spool" / "ready").iterdir())) == 0, 60)
            # Room again: an instance refused before is taken.
            assert send_one(gateway.port, refused[-1]) == 0
        finally:
            gateway.stop()
            stop(scp)
    arrived = {uid for uid, _ in archived([tmp_path / "scp"])}
    assert len(arrived) == len(acked) + 1
    print(f"6 MiB spool: {len(acked)} of {len(files)} accepted, then 0xA700; "
          f"statuses {[hex(s) if s is not None else None for s in statuses]}")

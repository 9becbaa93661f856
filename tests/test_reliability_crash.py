"""kill -9 at random moments under a sender that keeps sending.

The gateway runs as ``deid-gateway serve`` in its own process and forwards to
two destinations, dcmtk's storescp (writing every arrival under a unique file
name, so a second delivery is seen) and a folder. Twenty times it is killed
with SIGKILL after a random delay, while it is receiving, de-identifying and
forwarding, and started again at once. The sender is a modality's queue: it
resends whatever was not answered Success.
"""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.deid import SecretKey
from gateway.forward import PARTIAL_DIR
from gateway.synthetic import PlantedPHI
from tests.peers import DCMTK_ENV, STORESCP, Gateway, free_port, stop, wait_for_port
from tests.reliability import (
    Sender,
    archived,
    expected_uids,
    gateway_config,
    hidden_files,
    make_instances,
    wait_until,
)

KILLS = 20
INSTANCES = 120
SEED = 7


def leftovers(spool: Path, folder: Path) -> dict[Path, tuple[int, int]]:
    """Files a killed gateway may leave half-written (never acknowledged or not yet
    delivered, and the folder destination's writes in progress in ``.partial/``),
    with their identity (inode, mtime): after a restart the same entry may be
    worked on again under the same name, which is a new file, not a survivor."""
    found = {p for sub in ("incoming", "work", "done") for p in (spool / sub).rglob("*")}
    identities = {p: _identity(p) for p in found | set(hidden_files(folder))}
    return {p: identity for p, identity in identities.items() if identity != _GONE}


_GONE = (-1, -1)


def _identity(path: Path) -> tuple[int, int]:
    """(inode, mtime), or ``_GONE`` for a file no longer there."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return _GONE
    return (stat.st_ino, stat.st_mtime_ns)


@pytest.mark.integration
def test_sigkill_twenty_times_loses_nothing_acknowledged_and_forwards_nothing_else(
    tmp_path: Path, key: SecretKey, key_file: Path
) -> None:
    rng = random.Random(SEED)
    phi = PlantedPHI.create(71)
    files = make_instances(tmp_path / "in", INSTANCES, phi)
    expected = expected_uids(files, key, tmp_path / "scratch.dcm")

    scp_dir, folder = tmp_path / "storescp", tmp_path / "folder"
    scp_dir.mkdir()
    scp_port = free_port()
    scp = subprocess.Popen(
        [STORESCP, "-aet", "ARCHIVE", "-od", str(scp_dir), "+uf", "+xa", str(scp_port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway = Gateway(
        tmp_path / "gw",
        gateway_config(
            tmp_path / "gw",
            key_file,
            [
                {"name": "pacs", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": scp_port},
                {"name": "folder", "folder": str(folder)},
            ],
        ),
    )
    spool = tmp_path / "gw" / "spool"
    sender: Sender | None = None
    phases = {"incoming": 0, "work": 0, "ready": 0, "partial": 0}
    try:
        wait_for_port(scp_port, scp)
        gateway.start()
        sender = Sender(gateway.port, files, per_association=10).start()
        started = time.monotonic()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.1, 0.8))
            gateway.kill()
            left = leftovers(spool, folder)
            phases["incoming"] += any((spool / "incoming").iterdir())
            phases["work"] += any((spool / "work").iterdir())
            phases["ready"] += any((spool / "ready").iterdir())
            phases["partial"] += any((folder / PARTIAL_DIR).iterdir())
            gateway.start()
            still = {p for p, identity in left.items() if _identity(p) == identity}
            assert not still, f"half-written files survived the restart: {sorted(still)[:3]}"
        assert sender.wait_done(60), f"only {len(sender.acked)} of {INSTANCES} acknowledged"
        sender.stop()
        assert wait_until(lambda: not any((spool / "ready").iterdir()), 60), "spool not drained"
        elapsed = time.monotonic() - started
        gateway.stop()
        assert gateway.proc is not None and gateway.proc.returncode == 0
    finally:
        if sender is not None:
            sender.stop()
        gateway.stop()
        stop(scp)

    # Kills landed while instances were being received and while they were worked on.
    assert phases["incoming"] > 0 and phases["work"] + phases["ready"] > 0, phases
    want = {expected[p] for p in sender.acked}
    assert len(want) == INSTANCES
    for name, destination in (("storescp", scp_dir), ("folder", folder)):
        arrivals = archived([destination])
        uids = {uid for uid, _ in arrivals}
        assert uids == want, f"{name}: {len(want - uids)} acknowledged missing, {len(uids - want)} unexpected"
        # At-least-once delivery: a kill between the archive's Success and the
        # spool's record sends the same instance again. The UIDs are keyed
        # functions of the original, so a repeat is the same instance, byte for byte.
        contents: dict[str, bytes] = {}
        for uid, content in arrivals:
            assert contents.setdefault(uid, content) == content, f"{name}: two versions of one UID"
        print(f"{name}: {len(uids)} instances, {len(arrivals) - len(uids)} repeated deliveries")
    # Nothing but whole instances in place: no temporary file of a write a
    # kill interrupted, in .partial/ or anywhere else, and the layout holds.
    assert hidden_files(folder) == []
    assert list((folder / PARTIAL_DIR).iterdir()) == []
    for path in (p for p in folder.rglob("*") if p.is_file()):
        study, series, name = path.relative_to(folder).parts
        ds = dcmread(path, stop_before_pixels=True)
        assert (study, series, name) == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            f"{ds.SOPInstanceUID}.dcm",
        )
    print(
        f"{KILLS} kills in {elapsed:.1f} s, sender: {sender.attempts} C-STOREs, "
        f"{sender.failures} failures; kill found work in {phases}"
    )

"""Spool durability and recovery, and the quarantine that takes entries from it."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from gateway.quarantine import Quarantine, Reason
from gateway.spool import EntryInfo, EntryState, Spool, SpoolFullError, SpoolLockedError

INFO = EntryInfo("SCANNER", "1.2.840.10008.5.1.4.1.1.77.1.6", "1.2.840.10008.1.2.1", "r", 5)


def received(spool: Spool, data: bytes = b"hello") -> Path:
    path = spool.incoming / "recv-test.dcm"
    path.write_bytes(data)
    return path


def test_admit_is_durable_and_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert spool.open() == []
    first = spool.admit(received(spool, b"one"), INFO)
    second = spool.admit(received(spool, b"two"), INFO)
    assert not any(spool.incoming.iterdir())
    assert spool.instance(first).read_bytes() == b"one"
    assert oct(spool.root.stat().st_mode & 0o777) == "0o700"
    spool.close()
    reopened = Spool(tmp_path / "spool")
    assert set(reopened.open()) == {first, second}
    assert reopened.info(first) == INFO
    assert reopened.state(first) == EntryState()


def test_recovery_drops_what_was_never_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    kept = spool.admit(received(spool), INFO)
    # a receive cut short, a commit cut short before its rename, a half-made ready dir,
    # a deletion cut short and a stale de-identified output
    (spool.incoming / "recv-partial.dcm").write_bytes(b"part")
    (spool.incoming / "abc").mkdir()
    (spool.incoming / "abc" / "instance.dcm").write_bytes(b"x")
    (spool.ready / "broken").mkdir()
    (spool.done / "gone").mkdir()
    (spool.work / "gone.dcm").write_bytes(b"x")
    spool.close()
    assert Spool(tmp_path / "spool").open() == [kept]
    for directory in (spool.incoming, spool.done, spool.work):
        assert list(directory.iterdir()) == []
    assert not (spool.ready / "broken").exists()


def test_state_is_replaced_atomically_and_remove_deletes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    entry = spool.admit(received(spool), INFO)
    spool.save_state(entry, EntryState(2, ["pacs"], "archive: status 0xA700"))
    assert spool.state(entry) == EntryState(2, ["pacs"], "archive: status 0xA700")
    assert [p.name for p in spool.path(entry).iterdir() if p.name.startswith(".")] == []
    spool.remove(entry)
    assert spool.pending() == []
    assert list(spool.done.iterdir()) == []


def test_free_space_floor_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    spool.open()
    path = received(spool)
    with pytest.raises(SpoolFullError):
        spool.admit(path, INFO)
    assert list(spool.incoming.iterdir()) == []
    assert spool.pending() == []


def test_disk_full_during_commit_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    path = received(spool)

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("gateway.spool.write_json_new", full)
    with pytest.raises(SpoolFullError):
        spool.admit(path, INFO)
    assert list(spool.incoming.iterdir()) == []
    assert spool.pending() == []


def test_quarantine_hold_release_purge(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    quarantine = Quarantine(tmp_path / "quarantine")
    quarantine.open()
    entry = spool.admit(received(spool), INFO)
    spool.save_state(entry, EntryState(3, ["folder"], "pacs: association failed"))
    quarantine.hold(spool, entry, Reason("retries-exhausted", "3 attempts"))
    assert spool.pending() == []
    held = quarantine.get(entry)
    assert held.reason.code == "retries-exhausted"
    assert held.info == INFO
    assert held.size == 5
    quarantine.release(entry, spool)
    assert spool.pending() == [entry]
    assert spool.state(entry) == EntryState(0, ["folder"], None)
    assert quarantine.ids() == []
    quarantine.hold(spool, entry, Reason("label-image", "LABEL"))
    quarantine.purge(entry)
    assert quarantine.ids() == []
    with pytest.raises(KeyError):
        quarantine.get(entry)


def test_one_spool_one_gateway_and_its_children(tmp_path: Path) -> None:
    """The lock keeps a second gateway out, also while a child that inherited it lives."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    with pytest.raises(SpoolLockedError):
        Spool(tmp_path / "spool").open(wait=0.2)
    assert spool.lock_fd is not None
    child = subprocess.Popen(["sleep", "30"], pass_fds=[spool.lock_fd])
    try:
        spool.close()
        with pytest.raises(SpoolLockedError):
            Spool(tmp_path / "spool").open(wait=0.2)
    finally:
        child.kill()
        child.wait()
    again = Spool(tmp_path / "spool")
    assert again.open(wait=5) == []
    again.close()

"""Spool durability and recovery, and the quarantine that takes entries from it."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from gateway.quarantine import Quarantine, Reason
from gateway.received_file import ReceivedFile
from gateway.spool import (
    ENTRY,
    INSTANCE,
    EntryInfo,
    EntryState,
    Spool,
    SpoolFullError,
    SpoolLockedError,
)

INFO = EntryInfo("SCANNER", "1.2.840.10008.5.1.4.1.1.77.1.6", "1.2.840.10008.1.2.1", "r", 5)


def received(spool: Spool, data: bytes = b"hello") -> Path:
    path = spool.incoming / "recv-test.dcm"
    path.write_bytes(data)
    return path


def received_in_slot(spool: Spool, data: bytes) -> ReceivedFile:
    """A data set received as the receiving process does: into a spool slot."""
    file = ReceivedFile.in_directory(spool.slot(), INSTANCE)
    file.write(data)
    file.finish_writeback()
    return file


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
    # a recycled entry whose truncation a crash undid
    (spool.free / "kept").mkdir()
    (spool.free / "kept" / INSTANCE).write_bytes(b"an earlier instance")
    spool.close()
    assert Spool(tmp_path / "spool").open() == [kept]
    for directory in (spool.incoming, spool.done, spool.free, spool.work):
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


def test_delivered_entries_are_reused_without_new_inodes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    file = received_in_slot(spool, b"the first instance")
    first = spool.admit(Path(file.name), INFO)
    file.delete()  # as the store service does once the handler returns
    assert list(spool.incoming.iterdir()) == []
    assert spool.instance(first).read_bytes() == b"the first instance"
    entry_dir = spool.path(first)
    inodes = [path.stat().st_ino for path in (entry_dir, entry_dir / INSTANCE, entry_dir / ENTRY)]
    spool.save_state(first, EntryState(1, [], "archive: status 0xA700"))

    spool.remove(first)
    assert spool.pending() == []
    assert list(spool.done.iterdir()) == []
    [kept] = spool.free.iterdir()
    assert sorted(p.name for p in kept.iterdir()) == [ENTRY, INSTANCE]  # no state carried over
    assert (kept / INSTANCE).stat().st_size == 0  # nothing of the instance is kept

    other = EntryInfo("OTHER", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2", "r", 6)
    file = received_in_slot(spool, b"second")
    second = spool.admit(Path(file.name), other)
    file.delete()
    assert list(spool.free.iterdir()) == []
    entry_dir = spool.path(second)
    assert [path.stat().st_ino for path in (entry_dir, entry_dir / INSTANCE, entry_dir / ENTRY)] == inodes
    assert spool.instance(second).read_bytes() == b"second"
    assert spool.info(second) == other
    assert spool.state(second) == EntryState()
    assert oct((entry_dir / INSTANCE).stat().st_mode & 0o777) == "0o600"


def test_free_keeps_a_bounded_number_of_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.spool.FREE_SLOTS", 2)
    spool = Spool(tmp_path / "spool")
    spool.open()
    entries = [spool.admit(received(spool, b"x"), INFO) for _ in range(4)]
    for entry in entries:
        spool.remove(entry)
    assert len(list(spool.free.iterdir())) == 2
    assert list(spool.done.iterdir()) == []


def test_a_slot_is_made_when_free_entries_cannot_be_taken(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    (spool.free / "stray").write_bytes(b"x")  # not an entry's directory
    (spool.free / "link").symlink_to(tmp_path)  # nor a link to one
    spool.incoming.rmdir()
    with pytest.raises(FileNotFoundError):  # no incoming/: every rename fails; no endless retry
        spool.slot()
    spool.incoming.mkdir()
    slot = spool.slot()
    assert slot.parent == spool.incoming
    assert slot.is_dir() and not slot.is_symlink()
    assert [p.name for p in spool.incoming.iterdir()] == [slot.name]  # the others were dropped
    assert list(spool.free.iterdir()) == []


def test_a_refused_receipt_leaves_no_slot_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    entry = spool.admit(received(spool), INFO)
    spool.remove(entry)  # so the next slot is a recycled one, with an entry file in it
    file = received_in_slot(spool, b"refused")
    Path(file.name).unlink()  # as the handler does when it refuses
    file.delete()
    assert list(spool.incoming.iterdir()) == []
    assert spool.pending() == []


def test_free_space_floor_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    spool.open()
    path = received(spool)
    with pytest.raises(SpoolFullError):
        spool.admit(path, INFO)
    assert list(spool.incoming.iterdir()) == []
    assert spool.pending() == []


def test_room_is_kept_for_one_more_copy_of_a_received_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance already on the spool's disk (received into incoming/ or into
    a slot) needs room for its de-identified copy only; one from elsewhere
    for itself as well."""
    spool = Spool(tmp_path / "spool", min_free_bytes=1000)
    spool.open()
    monkeypatch.setattr(Spool, "free_bytes", lambda self: 1000 + INFO.size)
    assert spool.admit(received(spool), INFO) in spool.pending()
    file = received_in_slot(spool, b"hello")
    assert spool.admit(Path(file.name), INFO) in spool.pending()
    file.delete()
    elsewhere = tmp_path / "elsewhere.dcm"
    elsewhere.write_bytes(b"hello")
    with pytest.raises(SpoolFullError):
        spool.admit(elsewhere, INFO)


def test_disk_full_during_commit_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    path = received(spool)

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("gateway.spool.write_json_unseen", full)
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

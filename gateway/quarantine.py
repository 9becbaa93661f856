"""Instances held back for a person to look at, each with a PHI-free reason.

A quarantined entry is the spool entry directory moved as a whole (the
original instance, how it arrived, its forwarding state) plus ``reason.json``.
The original still carries PHI, so the directory is owner-only.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.spool import (
    ENTRY,
    INSTANCE,
    STATE,
    EntryInfo,
    EntryState,
    Spool,
    fsync_dir,
    fsync_file,
    read_state,
    write_json_atomic,
)

REASON = "reason.json"


@dataclass(frozen=True)
class Reason:
    """Why an instance is held. ``code`` and ``detail`` never carry values from the data."""

    code: str
    detail: str
    when: str = field(default_factory=lambda: datetime.now(UTC).isoformat())


@dataclass(frozen=True)
class QuarantinedEntry:
    entry_id: str
    reason: Reason
    info: EntryInfo
    state: EntryState
    size: int


class Quarantine:
    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        # A hold interrupted while copying across file systems leaves a hidden
        # partial copy; the spool entry is still intact, so drop the copy.
        for child in self.root.glob(".*.partial"):
            shutil.rmtree(child)

    def hold(self, spool: Spool, entry_id: str, reason: Reason) -> None:
        """Move a spool entry here, atomically when on the same file system."""
        source = spool.path(entry_id)
        write_json_atomic(source / REASON, asdict(reason))
        target = self.root / entry_id
        try:
            source.rename(target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            partial = self.root / f".{entry_id}.partial"
            shutil.copytree(source, partial)
            for child in partial.iterdir():
                fsync_file(child)
            partial.rename(target)
            fsync_dir(self.root)
            shutil.rmtree(source)
        fsync_dir(self.root)
        fsync_dir(spool.ready)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            child.name
            for child in self.root.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        )

    def get(self, entry_id: str) -> QuarantinedEntry:
        directory = self.root / entry_id
        if not entry_id or "/" in entry_id or not (directory / REASON).is_file():
            raise KeyError(entry_id)
        return QuarantinedEntry(
            entry_id=entry_id,
            reason=Reason(**json.loads((directory / REASON).read_text(encoding="utf-8"))),
            info=EntryInfo(**json.loads((directory / ENTRY).read_text(encoding="utf-8"))),
            state=read_state(directory),
            size=(directory / INSTANCE).stat().st_size,
        )

    def entries(self) -> list[QuarantinedEntry]:
        return [self.get(entry_id) for entry_id in self.ids()]

    def release(self, entry_id: str, spool: Spool) -> None:
        """Put an entry back in the spool with its attempts reset.

        Destinations already served stay served. A running node picks the entry
        up at its next start, or at once when it watches the spool.
        """
        self.get(entry_id)
        directory = self.root / entry_id
        state = read_state(directory)
        write_json_atomic(directory / STATE, asdict(EntryState(0, state.delivered, None)))
        (directory / REASON).unlink()
        target = spool.path(entry_id)
        try:
            directory.rename(target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            staging = spool.incoming / entry_id
            shutil.copytree(directory, staging)
            for child in staging.iterdir():
                fsync_file(child)
            staging.rename(target)
            shutil.rmtree(directory)
        fsync_dir(spool.ready)
        fsync_dir(self.root)

    def purge(self, entry_id: str) -> None:
        self.get(entry_id)
        shutil.rmtree(self.root / entry_id)
        fsync_dir(self.root)

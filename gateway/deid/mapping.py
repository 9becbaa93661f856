"""Evidence of what replaced what: the UID and patient-ID mappings.

Written as CSV with the columns ``id_old,id_new``, kept apart from the research
output, in a folder only its owner can enter and files only its owner can
read: these files re-identify the data, so they are as sensitive as the input.
"""

from __future__ import annotations

import csv
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from gateway.deid.report import DeidReport

UID_FILE = "uid_mapping.csv"
PATIENT_FILE = "patient_id_mapping.csv"
HEADER = ("id_old", "id_new")


class MappingWriter:
    """Append each new (old, new) pair once; safe to share between threads."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        self._lock = threading.Lock()
        self._files = {name: directory / name for name in (UID_FILE, PATIENT_FILE)}
        self._seen: dict[str, set[tuple[str, str]]] = {}
        for name, path in self._files.items():
            self._seen[name] = self._load_or_create(path)

    @staticmethod
    def _load_or_create(path: Path) -> set[tuple[str, str]]:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                csv.writer(handle).writerow(HEADER)
            return set()
        path.chmod(0o600)
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
        return {(row[0], row[1]) for row in rows[1:] if len(row) == 2}

    def add(self, report: DeidReport) -> None:
        """Record the mappings of one de-identified instance."""
        with self._lock:
            self._append(UID_FILE, report.uid_map.items())
            self._append(PATIENT_FILE, report.patient_map.items())

    def _append(self, name: str, pairs: Iterable[tuple[str, str]]) -> None:
        seen = self._seen[name]
        new = [pair for pair in pairs if pair not in seen]
        if not new:
            return
        with self._files[name].open("a", encoding="utf-8", newline="") as handle:
            csv.writer(handle).writerows(new)
            handle.flush()
            os.fsync(handle.fileno())
        seen.update(new)

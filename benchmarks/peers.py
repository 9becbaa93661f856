"""The processes a benchmark run drives: dcmtk's storescu and storescp, the gateway, Orthanc.

Every server binds 127.0.0.1 on a free port and is stopped by its own process
id. dcmtk programs are called by absolute path (pynetdicom installs a
``storescu`` script of its own earlier in PATH) and every dcmtk-based process
gets ``TCP_NODELAY=1``: Debian's dcmtk sets the socket option only then, and
without it each small instance waits about 45 ms on a delayed ACK.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.peers import DCMTK_ENV, ORTHANC, STORESCP, STORESCU, free_port, stop, wait_for_port

#: The PDU size of the baseline, on both sides (dcmtk's largest).
DCMTK_PDU = 131072
GATEWAY_AE = "DEID_GATEWAY"
#: How long a peer may take to listen (the gateway loads its tables first).
STARTUP_SECONDS = 60.0
CALLING_AE = "BENCH"


def storescu(port: int, files: Sequence[Path], called: str) -> subprocess.Popen[bytes]:
    """Start sending ``files`` as they are: only the contexts they need (``-R``), JPEG as is (``-xy``)."""
    return subprocess.Popen(
        [STORESCU, "-aet", CALLING_AE, "-aec", called, "-R", "-xy", "-nh",
         "-pdu", str(DCMTK_PDU), "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


class Sender:
    """One storescu run, with the time its last C-STORE response arrived (process exit)."""

    def __init__(self, port: int, files: Sequence[Path], called: str) -> None:
        self.started = time.perf_counter()
        self.proc = storescu(port, files, called)
        self.finished: float | None = None
        self.stderr = b""
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        _, self.stderr = self.proc.communicate()
        self.finished = time.perf_counter()

    def join(self, timeout: float) -> float:
        """Seconds from start to exit; raises when storescu failed."""
        self._thread.join(timeout)
        if self.finished is None:
            stop(self.proc)
            raise TimeoutError("storescu did not finish in time")
        if self.proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {self.stderr.decode(errors='replace')[-2000:]}")
        return self.finished - self.started


class Storescp:
    """dcmtk's storescp writing every instance bit-preserved (``+B``) into ``directory``."""

    def __init__(self, directory: Path, ae_title: str = "ARCHIVE") -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Storescp:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [STORESCP, "-aet", self.ae_title, "-od", str(self.directory), "+xa", "+B", "-pm",
             "-pdu", str(DCMTK_PDU), str(self.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc, timeout=STARTUP_SECONDS)
        return self

    def stop(self) -> None:
        stop(self.proc)

    def files(self) -> list[Path]:
        return [p for p in self.directory.iterdir() if not p.name.startswith(".")]

    def holds(self, count: int) -> bool:
        """True once ``count`` files are there and storescp has none of them open.

        storescp answers a C-STORE only after closing the file, so a closed
        file is a stored instance; looking at its open descriptors avoids
        mistaking a file still being written for a stored one.
        """
        if len(self.files()) < count:
            return False
        assert self.proc is not None
        prefix = str(self.directory) + os.sep
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if str(fd.readlink()).startswith(prefix):
                    return False
            except OSError:
                continue
        return True

    def clear(self) -> None:
        for path in self.files():
            path.unlink()


#: inotify event bits (``<sys/inotify.h>``): a file written to was closed; the queue overflowed.
_IN_CLOSE_WRITE = 0x00000008
_IN_Q_OVERFLOW = 0x00004000
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)


class ClosedFiles:
    """Counts the files closed after writing in a directory (Linux inotify).

    Waiting for an archive to hold a workload this way costs no CPU. Polling
    the directory (and storescp's open files) every 5 ms took about a tenth
    of a core, in gateway rounds only, on a machine whose two cores the
    gateway and its peers share. storescp answers a C-STORE only after
    closing the instance's file, so each close is a stored instance.
    """

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), _IN_CLOSE_WRITE) < 0:
            error = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(error, f"inotify_add_watch failed on {directory}")
        self.count = 0

    def __enter__(self) -> ClosedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def wait(self, count: int, timeout: float, check: Callable[[], None]) -> float:
        """The ``perf_counter`` time at which the ``count``-th file was seen
        closed; ``check`` runs every quarter of a second and may raise."""
        deadline = time.perf_counter() + timeout
        seen = time.perf_counter()
        while self.count < count:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{self.count} of {count} files closed in time")
            ready, _, _ = select.select([self._fd], [], [], min(0.25, left))
            if not ready:
                check()
                continue
            seen = time.perf_counter()
            self.count += self._closes(os.read(self._fd, 1 << 16))
        return seen

    @staticmethod
    def _closes(events: bytes) -> int:
        closes = offset = 0
        while offset < len(events):
            _, mask, _, length = _INOTIFY_EVENT.unpack_from(events, offset)
            if mask & _IN_Q_OVERFLOW:
                raise RuntimeError("inotify queue overflow: closes were lost")
            closes += bool(mask & _IN_CLOSE_WRITE)
            offset += _INOTIFY_EVENT.size + length
        return closes


class Gateway:
    """``python -m gateway serve`` in its own process, research profile, one DICOM destination."""

    def __init__(self, directory: Path, key_file: Path, archive: Storescp) -> None:
        self.directory = directory
        self.port = free_port()
        self.config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": self.port, "ae_title": GATEWAY_AE},
            "allowed_callers": [{"ae_title": CALLING_AE, "hosts": ["127.0.0.1"]}],
            "spool_dir": "spool",
            "quarantine_dir": "quarantine",
            "key_file": str(key_file),
            "profile": "research",
            "destinations": [
                {"name": "archive", "ae_title": archive.ae_title, "host": "127.0.0.1",
                 "port": archive.port},
            ],
            "limits": {"max_instance_bytes": "16GiB"},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "gateway.yaml"

    def start(self) -> Gateway:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        with (self.directory / "gateway.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
                cwd=self.directory, stdout=log, stderr=log,
            )
        try:
            wait_for_port(self.port, self.proc, timeout=STARTUP_SECONDS)
        except (RuntimeError, TimeoutError) as exc:
            tail = (self.directory / "gateway.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the gateway did not start: {exc}\n{tail}") from None
        return self

    def stop(self) -> None:
        stop(self.proc)

    def pending(self) -> int:
        """Entries still in the spool: acknowledged and not yet delivered, or
        delivered and still being deleted (deleting a 1 GB entry takes the
        disk most of a second, which the next round must not share)."""
        spool = self.directory / "spool"
        return sum(
            sum(1 for _ in (spool / part).iterdir()) if (spool / part).is_dir() else 0
            for part in ("ready", "done")
        )

    def quarantined(self) -> int:
        held = self.directory / "quarantine"
        return sum(1 for p in held.iterdir() if p.is_dir()) if held.is_dir() else 0


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc/<pid>/task/*/children."""
    found = [pid]
    index = 0
    while index < len(found):
        for task in Path(f"/proc/{found[index]}/task").glob("*"):
            try:
                found.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
        index += 1
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemoryWatch:
    """Samples a process tree's resident memory while a workload runs.

    ``peak_kib`` is the larger of the highest sampled VmRSS sum and the sum of
    the processes' own high-water marks (VmHWM), so no spike between two
    samples is missed. The kernel keeps each high-water mark, so sampling
    only has to find the processes: every quarter of a second (at every
    20 ms, each sample of a gateway's tree took about 1 ms of CPU, 5 % of a
    core taken from the rounds it measured).
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.sampled_kib = 0
        self._hwm: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        total = 0
        for pid in _tree(self.pid):
            total += _status_kib(pid, "VmRSS")
            self._hwm[pid] = max(self._hwm.get(pid, 0), _status_kib(pid, "VmHWM"))
        self.sampled_kib = max(self.sampled_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak_kib(self) -> int:
        return max(self.sampled_kib, sum(self._hwm.values()))


class Orthanc:
    """Orthanc with its storage under ``directory``, DICOM and HTTP on 127.0.0.1 only."""

    def __init__(self, directory: Path, archive: Storescp) -> None:
        self.directory = directory
        self.archive = archive
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench",
            "DicomAet": "ORTHANC",
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "Plugins": [],
            "DicomCheckCalledAet": True,
            "UnknownSopClassAccepted": True,
            "DicomAlwaysAllowStore": True,
            "StorageCompression": False,
            "MaximumPduLength": DCMTK_PDU,
            "DicomModalities": {"archive": [self.archive.ae_title, "127.0.0.1", self.archive.port]},
        }
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        self.proc = subprocess.Popen(
            [ORTHANC, str(path)], env=DCMTK_ENV, cwd=self.directory,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.http_port, self.proc, timeout=STARTUP_SECONDS)
        wait_for_port(self.port, self.proc, timeout=STARTUP_SECONDS)
        return self

    def request(self, method: str, path: str, body: object | None = None, timeout: float = 600) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def stop(self) -> None:
        stop(self.proc)

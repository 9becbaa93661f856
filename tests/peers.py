"""Real DICOM peers for the integration tests: dcmtk, Orthanc and the gateway itself.

Every server binds 127.0.0.1 on a free port and is stopped by its own process
id. dcmtk programs are called by absolute path (pynetdicom installs a
``storescu`` script of its own earlier in PATH) with ``TCP_NODELAY=1``, which
Debian's dcmtk needs to set the socket option.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its pid; escalate to SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Storescp:
    """dcmtk's storescp writing every instance, bit-preserved, into ``directory``."""

    def __init__(self, directory: Path, ae_title: str = "ARCHIVE", port: int | None = None) -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Storescp:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [STORESCP, "-aet", self.ae_title, "-od", str(self.directory), "+xa", "+B",
             "-pm", "--max-pdu", "131072", str(self.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        stop(self.proc)

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())


class Orthanc:
    """Orthanc with its storage in ``directory``, DICOM and HTTP on loopback."""

    def __init__(self, directory: Path, ae_title: str = "ORTHANC") -> None:
        self.directory = directory
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test",
            "DicomAet": self.ae_title,
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
        }
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            [ORTHANC, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=DCMTK_ENV,
        )
        wait_for_port(self.http_port, self.proc)
        wait_for_port(self.port, self.proc)
        return self

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return bytes(response.read())

    def stop(self) -> None:
        stop(self.proc)


def storescu(
    port: int, files: list[Path], *, calling: str = "SCANNER", called: str = "DEID_GATEWAY",
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` as they are (``-R``: only the contexts they need, their own syntax)."""
    return subprocess.run(
        [STORESCU, "-aet", calling, "-aec", called, "-R", "-xy", "-nh",
         "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False,
    )


class Gateway:
    """``deid-gateway serve`` in its own process, configured by a YAML file."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.port = free_port()
        self.config = {**config, "listen": {**config.get("listen", {}), "port": self.port,
                                            "host": "127.0.0.1", "ae_title": "DEID_GATEWAY"}}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "gateway.log"

    def start(self) -> Gateway:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "gateway.yaml"
        path.write_text(yaml.safe_dump(self.config))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                cwd=self.directory, stdout=log, stderr=log,
                start_new_session=True,  # its own process group: kill() waits for all of it
            )
        wait_for_port(self.port, self.proc, timeout=60)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop(self.proc, sig)

    def kill(self) -> None:
        """kill -9 of the gateway's main process: no clean-up of any kind.

        Returns once every process of the gateway's process group has ended
        (the kernel kills the receiving process with its parent, but a process
        blocked in an fsync ends only when that returns, and until then its
        listening socket still accepts connections), as a supervisor that
        restarts the service once all of it is gone would.
        """
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            _wait_group_ended(self.proc.pid, timeout=10)


def _wait_group_ended(pgid: int, timeout: float) -> None:
    """Wait until no process of group ``pgid`` is alive (zombies nobody has
    reaped yet count as ended)."""
    deadline = time.monotonic() + timeout
    while alive := _group_alive(pgid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {alive} of group {pgid} did not end")
        time.sleep(0.01)


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After the command name in parentheses: state, ppid, pgrp, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive

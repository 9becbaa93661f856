"""The file a C-STORE data set is received into: flushed to disk while it
arrives, and a flush that fails fails the instance."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

import gateway.received_file as received_file
from gateway.received_file import ReceivedFile

STEP = 4096


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Small steps, and a record of the sizes the helper flushes saw."""
    monkeypatch.setattr(received_file, "WRITEBACK_STEP", STEP)
    seen: list[int] = []
    real = received_file._flush_and_close

    def flush(fd: int) -> None:
        seen.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(received_file, "_flush_and_close", flush)
    return seen


def test_a_file_is_flushed_while_it_arrives(tmp_path: Path, flushes: list[int]) -> None:
    received = ReceivedFile(tmp_path, delete=False, mode="wb", suffix=".dcm")
    data = bytes(range(256)) * 64  # four steps
    for start in range(0, len(data), 1000):
        received.write(data[start : start + 1000])
    received.finish_writeback()
    assert received.error is None
    assert flushes and all(size >= STEP for size in flushes)
    received.close()
    assert Path(received.name).read_bytes() == data


def test_a_failed_flush_fails_the_file(tmp_path: Path, flushes: list[int],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        os.close(fd)
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(received_file, "_flush_and_close", broken)
    received = ReceivedFile(tmp_path, delete=False, mode="wb", suffix=".dcm")
    received.write(b"x" * (STEP + 1))
    received.finish_writeback()
    assert received.error is not None and received.error.errno == errno.EIO
    received.close()
    assert Path(received.name).stat().st_size == 0  # the space is given back


def test_the_flush_has_a_descriptor_of_its_own(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The file may be closed (an aborted association) while its flush runs."""
    monkeypatch.setattr(received_file, "WRITEBACK_STEP", STEP)
    release = threading.Event()
    done: list[int] = []

    def slow(fd: int) -> None:
        release.wait(5)
        os.fdatasync(fd)  # raises EBADF if the descriptor were the file's own
        os.close(fd)
        done.append(fd)

    monkeypatch.setattr(received_file, "_flush_and_close", slow)
    received = ReceivedFile(tmp_path, delete=False, mode="wb", suffix=".dcm")
    received.write(b"y" * (STEP + 1))
    received.close()
    release.set()
    for _ in range(100):
        if done:
            break
        time.sleep(0.05)
    assert done

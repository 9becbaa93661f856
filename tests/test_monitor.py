"""Periodic destination checks: results follow the destination, feed the gauge and readiness."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from gateway import metrics
from gateway.health import writable_directory_check
from gateway.monitor import DestinationMonitor


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def up_gauge(name: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("deid_gateway_destination_up", {"destination": name})


def test_a_folder_destination_is_up_while_writable_and_down_once_gone(tmp_path: Path) -> None:
    folder = tmp_path / "archive"
    folder.mkdir()
    metrics.register_destinations(["archive"])
    monitor = DestinationMonitor(["archive"], lambda name: writable_directory_check(folder)(), 0.05)
    assert not monitor.is_up("archive")  # down until the first check passes
    monitor.start()
    try:
        wait_until(lambda: monitor.is_up("archive") and up_gauge("archive") == 1)
        shutil.rmtree(folder)
        wait_until(lambda: not monitor.is_up("archive") and up_gauge("archive") == 0)
        folder.mkdir()
        wait_until(lambda: monitor.is_up("archive"))
    finally:
        monitor.stop()
    assert not monitor.is_up("unknown")

"""Periodic destination checks: one background thread per destination.

Each thread checks its destination every ``interval`` seconds (the node
passes a C-ECHO for a DICOM peer and a write test for a folder), publishes the
result to ``deid_gateway_destination_up`` and keeps it for ``/readyz``, so a
readiness probe or a scrape never waits on the network. A destination counts
as down until its first check succeeds; a check that raises counts as down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from structlog.typing import FilteringBoundLogger

from gateway import metrics
from gateway.logs import get_logger


def _log() -> FilteringBoundLogger:
    """A logger built per call, so it follows the configuration made at start-up."""
    return get_logger(logger=__name__)


class DestinationMonitor:
    """Check every destination periodically and remember the last result."""

    def __init__(
        self, names: Iterable[str], check: Callable[[str], bool], interval: float
    ) -> None:
        self._names = tuple(names)
        self._check = check
        self._interval = interval
        self._up: dict[str, bool] = dict.fromkeys(self._names, False)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index, name in enumerate(self._names):
            thread = threading.Thread(
                target=self._run, args=(name,), name=f"destination-check-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop checking; a check under way is given a few seconds to return."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads.clear()

    def is_up(self, name: str) -> bool:
        """The result of the last check of ``name`` (False before the first one)."""
        with self._lock:
            return self._up.get(name, False)

    def _run(self, name: str) -> None:
        first = True
        while not self._stop.is_set():
            try:
                up = self._check(name) is True
            except Exception:  # a check that breaks means the destination is not usable
                up = False
            with self._lock:
                changed = first or self._up[name] != up
                self._up[name] = up
            metrics.set_destination_up(name, up)
            if changed:
                log = _log()
                (log.info if up else log.warning)(
                    "destination.up" if up else "destination.down", destination=name, up=up
                )
            first = False
            if self._stop.wait(self._interval):
                return

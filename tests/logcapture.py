"""Capture the gateway's log lines in memory for one test, then put logging back."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import structlog

from gateway import logs


@contextlib.contextmanager
def captured_logs(*, json: bool | None = None) -> Iterator[io.StringIO]:
    """Configure logging as ``serve`` does, into a string buffer; restore it after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    logs.configure_logging(stream, json=json)
    try:
        yield stream
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)

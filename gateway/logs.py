"""Structured, PHI-free logging with structlog.

:func:`configure_logging` sets up one processor chain for the gateway's own
structlog calls and for records of the standard :mod:`logging` module (such as
pynetdicom's): JSON lines when the stream is not a terminal, a readable console
format on one.

The chain ends in :class:`PhiGuard`, which lets through only an allowlist of
event keys, each with a rule its value must satisfy: one of a fixed set
(outcomes, image types, the reason codes of :mod:`gateway.metrics`, the
registered destinations), a UID or keyword of the DICOM registry, a SHA-256,
a non-negative integer, a finite number of seconds, an IP address, or the
AE-title pattern (AE titles come from the association, never from a dataset).
A key that is not on the list is dropped (the line then carries
``redacted_fields=N``); a value that breaks its key's rule is replaced by
``"[redacted]"``. Exceptions are reduced to their class name and the place
they were raised, because exception messages from parsers often quote the
value they choked on. Free-text messages from other libraries fail the event
name rule and are replaced too, so only their logger name and level remain.

The guard is deliberately strict: adding a key to a log line means adding it,
with a rule, to :data:`FIELD_RULES`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from types import TracebackType
from typing import Final, TextIO, cast

import structlog
from pydicom._uid_dict import UID_dictionary
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from gateway import metrics

MARKER: Final = "[redacted]"

_EVENT: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_LOGGER_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,99}")
_AE_TITLE: Final = re.compile(r"[A-Za-z0-9_.-](?:[A-Za-z0-9_. -]{0,14}[A-Za-z0-9_.-])?")
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_CLASS_NAME: Final = re.compile(r"[A-Z][A-Za-z0-9_]{0,79}")

_REGISTRY_UIDS: Final = frozenset(UID_dictionary)
_REGISTRY_KEYWORDS: Final = frozenset(entry[4] for entry in UID_dictionary.values() if entry[4])

OUTCOMES: Final = frozenset(
    {
        "accepted",
        "rejected",
        "passed",
        "dropped",
        "quarantined",
        "success",
        "failure",
        "retrying",
        "delivered",
        "error",
        "ok",
    }
)

Rule = Callable[[object], bool]


def _matches(pattern: re.Pattern[str], max_len: int = 100) -> Rule:
    def rule(value: object) -> bool:
        return isinstance(value, str) and len(value) <= max_len and bool(pattern.fullmatch(value))

    return rule


def _one_of(allowed: frozenset[str]) -> Rule:
    def rule(value: object) -> bool:
        return isinstance(value, str) and value in allowed

    return rule


def _registry_uid(value: object) -> bool:
    """A UID or keyword of the DICOM registry (SOP classes, transfer syntaxes, ...)."""
    return isinstance(value, str) and (value in _REGISTRY_UIDS or value in _REGISTRY_KEYWORDS)


def _sop_class(value: object) -> bool:
    """A SOP class as :func:`gateway.metrics.sop_class_label` gives it."""
    return value == metrics.OTHER or _registry_uid(value)


def _seconds(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _flag(value: object) -> bool:
    return isinstance(value, bool)


def _destination(value: object) -> bool:
    """Only destinations declared with :func:`gateway.metrics.register_destinations`."""
    return isinstance(value, str) and value in metrics.registered_destinations()


def _ip_address(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return value == "localhost"
    return True


#: Every key that may appear in a log line, with the rule its value must meet.
FIELD_RULES: Final[Mapping[str, Rule]] = {
    # added by the chain itself
    "event": _matches(_EVENT, 64),
    "level": _one_of(frozenset({"debug", "info", "warning", "error", "critical", "exception"})),
    "logger": _matches(_LOGGER_NAME),
    "error_type": _matches(_CLASS_NAME, 80),
    "error_where": _matches(re.compile(r"[A-Za-z0-9_.<>-]{1,120}:[0-9]{1,6}"), 128),
    # association and peer
    "assoc_id": _count,
    "calling_ae": _matches(_AE_TITLE, 16),
    "called_ae": _matches(_AE_TITLE, 16),
    "ae_title": _matches(_AE_TITLE, 16),
    "peer": _ip_address,
    "host": _ip_address,
    "port": _count,
    # instance (never an instance UID: those stay in the audit trail)
    "sop_class": _sop_class,
    "transfer_syntax": _registry_uid,
    "image_type": _one_of(metrics.IMAGE_TYPES),
    "outcome": _one_of(OUTCOMES),
    "reason": _one_of(
        metrics.INSTANCE_REASONS | metrics.ASSOCIATION_REJECT_REASONS | metrics.CUT_THROUGH_REASONS
    ),
    "status": _count,
    "destination": _destination,
    "profile_sha256": _matches(_SHA256, 64),
    "input_sha256": _matches(_SHA256, 64),
    "retry": _flag,
    "up": _flag,
    # sizes and counts
    "size_bytes": _count,
    "attempt": _count,
    "max_attempts": _count,
    "entries": _count,
    "recovered": _count,
    "count": _count,
    "audit_seq": _count,
    # timings
    "duration_seconds": _seconds,
    "receive_seconds": _seconds,
    "spool_seconds": _seconds,
    "deidentify_seconds": _seconds,
    "forward_seconds": _seconds,
    "total_seconds": _seconds,
    "backoff_seconds": _seconds,
    "age_seconds": _seconds,
}


class PhiGuard:
    """structlog processor that keeps only allowlisted keys with well-formed values."""

    def __init__(self, rules: Mapping[str, Rule] = FIELD_RULES) -> None:
        self._rules = rules

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        guarded: EventDict = {}
        dropped = 0
        for key, value in event_dict.items():
            rule = self._rules.get(key)
            if rule is None:
                dropped += 1
            else:
                guarded[key] = value if rule(value) else MARKER
        if dropped:
            guarded["redacted_fields"] = dropped
        return guarded


def summarize_exception(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """Replace ``exc_info`` by the exception's class name and where it was raised.

    The message and the traceback text are discarded: they may quote data.
    """
    exc_info = event_dict.pop("exc_info", None)
    event_dict.pop("stack_info", None)
    exc: BaseException | None = None
    if isinstance(exc_info, BaseException):
        exc = exc_info
    elif isinstance(exc_info, tuple) and len(exc_info) == 3:
        exc = exc_info[1] if isinstance(exc_info[1], BaseException) else None
    elif exc_info is True:
        exc = sys.exc_info()[1]
    if exc is not None:
        event_dict["error_type"] = type(exc).__name__
        tb: TracebackType | None = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            module = os.path.basename(tb.tb_frame.f_code.co_filename)  # noqa: PTH119
            event_dict["error_where"] = f"{module}:{tb.tb_lineno}"
    return event_dict


def configure_logging(
    stream: TextIO | None = None,
    *,
    json: bool | None = None,
    level: int = logging.INFO,
    capture_stdlib: bool = True,
) -> None:
    """Configure structlog (and, by default, the root stdlib logger).

    ``stream`` defaults to ``sys.stderr``. ``json`` defaults to "not a
    terminal". With ``capture_stdlib`` the root logger's handlers are replaced
    by one writing through the same guard, so records of pynetdicom and other
    libraries cannot bypass it.
    """
    out = sys.stderr if stream is None else stream
    use_json = not out.isatty() if json is None else json
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    tail: list[Processor] = [
        summarize_exception,
        PhiGuard(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *tail,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    if capture_stdlib:
        handler = logging.StreamHandler(out)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=[
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.add_logger_name,
                ],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *tail,
                    renderer,
                ],
            )
        )
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(level)


def get_logger(**initial: object) -> FilteringBoundLogger:
    """A bound logger carrying ``initial`` fields (which the guard still checks)."""
    return cast(FilteringBoundLogger, structlog.get_logger().bind(**initial))


def association_logger(
    assoc_id: int, calling_ae: str, *, called_ae: str | None = None
) -> FilteringBoundLogger:
    """A logger for one association: every line carries its id and calling AE."""
    fields: MutableMapping[str, object] = {"assoc_id": assoc_id, "calling_ae": calling_ae}
    if called_ae is not None:
        fields["called_ae"] = called_ae
    return get_logger(**fields)


def instance_logger(
    log: FilteringBoundLogger,
    sop_class_uid: str | None,
    *,
    image_type: str | None = None,
) -> FilteringBoundLogger:
    """Bind an instance's SOP class (as its registry keyword) and image type to ``log``.

    Outcome and timings are passed per event, e.g.
    ``log.info("instance.deidentified", outcome="passed", deidentify_seconds=0.12)``.
    """
    bound = log.bind(sop_class=metrics.sop_class_label(sop_class_uid))
    if image_type is not None:
        bound = bound.bind(image_type=image_type)
    return bound

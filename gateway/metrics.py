"""Prometheus metrics of the gateway, all under the ``deid_gateway_`` prefix.

Every metric is a module-level object registered on :data:`REGISTRY`, a
registry of its own (plus the process and platform collectors) so that
``/metrics`` shows exactly what this module defines.

Labels must have low cardinality and must never carry a UID of an instance,
study or series, nor any value taken from a dataset. The metric objects are
public so that the dashboard and the alert rules can be checked against them,
but the network node records through the ``record_*``/``set_*`` helpers
below: each helper turns its arguments into bounded label values
(:func:`sop_class_label`, :func:`image_type_label`, :func:`reason_label`,
:func:`destination_label`), so that a careless call can neither leak a value
nor explode the number of series. A value outside a label's allowed set is
replaced by ``"other"`` and counted in
``deid_gateway_label_values_rejected_total{label=...}``, which makes the
mistake visible without taking the gateway down.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from pydicom._uid_dict import UID_dictionary

from gateway.deid.report import RedactionReason

NAMESPACE: Final = "deid_gateway"
OTHER: Final = "other"

REGISTRY: Final = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
#: The receiving process's id, set by :func:`watch_receiver_process`: the
#: ``process_*`` metrics describe the main process only.
_receiver_pid: Callable[[], int | None] | None = None


def _receiver_proc_name() -> int | str:
    """The receiving process's ``/proc`` entry; ``none`` (no entry, so no
    samples) while there is no receiving process."""
    pid = _receiver_pid() if _receiver_pid is not None else None
    return pid if pid is not None else "none"


ProcessCollector(namespace=f"{NAMESPACE}_receiver", pid=_receiver_proc_name, registry=REGISTRY)

# --- bounded label vocabularies ------------------------------------------------

#: Why the node refused an association (A-ASSOCIATE-RJ or abort at the edge).
ASSOCIATION_REJECT_REASONS: Final = frozenset(
    {
        "calling-ae-not-allowed",
        "called-ae-mismatch",
        "host-not-allowed",
        "too-many-associations",
        "no-acceptable-context",
        "shutting-down",
        "spool-full",
    }
)

#: Reason codes the de-identification engine gives (``DeidReport.reason``):
#: ``report.stop(...)`` in ``gateway/deid`` and the pixel policy's verdicts.
#: ``tests/test_metrics.py`` fails when the engine gains a code missing here.
ENGINE_REASONS: Final = frozenset(
    {
        "label-image",
        "overview-image",
        "thumbnail-image",
        "sop-class-dropped",
        "burned-in-annotation",
        "recognizable-visual-features",
        "burned-in-annotation-unknown",
        "unreadable",
        "missing-sop-uids",
        "patient-not-in-lookup",
        "unknown-attribute",
        "too-large-to-rewrite",
        "rewrite-failed",
        "phi-found-in-output",
        "policy",
    }
)

#: Why an OVERVIEW label could not be redacted: the engine quarantines with
#: these codes, taken from the redactor's own enumeration.
REDACTION_REASONS: Final = frozenset(reason.value for reason in RedactionReason)

#: Reasons the node itself gives: instances refused at receipt, quarantined
#: by the forwarder, or kept for a later try (``input-unreadable``: delivered,
#: but not readable for its audit record's hash).
NODE_REASONS: Final = frozenset(
    {
        "instance-too-large",
        "no-route",
        "malformed-data-set",
        "data-set-mismatch",
        "spool-full",
        "spool-write-failed",
        "route-missing",
        "internal-error",
        "destination-rejected",
        "retries-exhausted",
        "input-unreadable",
    }
)

#: Why an instance was not forwarded while it arrived (:mod:`gateway.cut_through`),
#: or why a request opened while it arrived was abandoned; it then takes the
#: normal path.
CUT_THROUGH_REASONS: Final = frozenset(
    {
        "gone",
        "header-unreadable",
        "not-passed-unchanged",
        "destinations-busy",
        "output-differs",
        "connection-lost",
        "not-admitted",
        "given-up",
        "not-completed",
    }
)

#: Reason codes of instances not forwarded. A code missing here is reported
#: as ``"other"`` in metrics and ``[redacted]`` in logs.
INSTANCE_REASONS: Final = ENGINE_REASONS | REDACTION_REASONS | NODE_REASONS

#: ``DeidReport.image_type`` values; ``None`` becomes ``"none"``.
IMAGE_TYPES: Final = frozenset({"VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL", "none"})

#: Outcomes of one forward attempt.
FORWARD_OUTCOMES: Final = frozenset({"success", "failure"})

#: Outcomes of the de-identification of one instance (``Outcome`` values).
DEID_OUTCOMES: Final = frozenset({"passed", "dropped", "quarantined"})

_SAFE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")

#: Standard SOP Class UIDs of the DICOM registry, mapped to their keywords.
_SOP_CLASS_KEYWORDS: Final[Mapping[str, str]] = {
    uid: entry[4]
    for uid, entry in UID_dictionary.items()
    if entry[1] in {"SOP Class", "Meta SOP Class"} and entry[4]
}

_destinations: frozenset[str] = frozenset()
_destinations_lock = threading.Lock()

LABEL_VALUES_REJECTED: Final = Counter(
    "label_values_rejected",
    "Label values replaced by 'other' because they were outside the allowed set.",
    ["label"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)


def _bounded(label: str, value: str, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is allowed for ``label``, otherwise ``"other"``.

    The refusal is counted per label name, never per value, so the offending
    value does not reach the registry in any form.
    """
    if value in allowed:
        return value
    LABEL_VALUES_REJECTED.labels(label=label).inc()
    return OTHER


def sop_class_label(sop_class_uid: str | None) -> str:
    """Map a SOP Class UID to a bounded label value.

    Standard SOP Classes of the DICOM registry become their keyword (e.g.
    ``VLWholeSlideMicroscopyImageStorage``); anything else, including private
    classes and any instance UID passed by mistake, becomes ``"other"``.
    """
    if sop_class_uid is None:
        return OTHER
    return _SOP_CLASS_KEYWORDS.get(str(sop_class_uid).strip(), OTHER)


def image_type_label(image_type: str | None) -> str:
    """Map ``DeidReport.image_type`` to a bounded label value."""
    return _bounded("image_type", "none" if image_type is None else image_type, IMAGE_TYPES)


def reason_label(reason: str | None) -> str:
    """Map an instance reason code to a bounded label value (``"none"`` for ``None``)."""
    if reason is None:
        return "none"
    return _bounded("reason", reason, INSTANCE_REASONS)


def destination_label(destination: str) -> str:
    """Map a destination name to itself if it was registered, else ``"other"``."""
    return _bounded("destination", destination, _destinations)


# --- metric objects ------------------------------------------------------------

BUILD_INFO: Final = Gauge(
    "build_info",
    "Always 1; labels give the gateway version and each loaded profile with its SHA-256.",
    ["version", "profile", "profile_sha256"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
ASSOCIATIONS_ACCEPTED: Final = Counter(
    "associations_accepted",
    "Associations accepted.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
ASSOCIATIONS_REJECTED: Final = Counter(
    "associations_rejected",
    "Associations rejected, by reason.",
    ["reason"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
INSTANCES_RECEIVED: Final = Counter(
    "instances_received",
    "Instances received by C-STORE and written to the spool, by SOP class.",
    ["sop_class"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
INSTANCES_REFUSED: Final = Counter(
    "instances_refused",
    "C-STORE requests answered with a failure status at receipt, by reason.",
    ["sop_class", "reason"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
INSTANCES_FORWARDED: Final = Counter(
    "instances_forwarded",
    "De-identified instances delivered to a destination.",
    ["sop_class", "image_type", "destination"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
INSTANCES_DROPPED: Final = Counter(
    "instances_dropped",
    "Instances that policy says are never forwarded, by reason.",
    ["sop_class", "image_type", "reason"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
INSTANCES_QUARANTINED: Final = Counter(
    "instances_quarantined",
    "Instances held back in quarantine, by reason.",
    ["sop_class", "image_type", "reason"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
RECEIVED_BYTES: Final = Counter(
    "received_bytes",
    "Bytes of instances received (as written to the spool).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
FORWARDED_BYTES: Final = Counter(
    "forwarded_bytes",
    "Bytes of de-identified instances delivered, by destination.",
    ["destination"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
DEIDENTIFY_DURATION: Final = Histogram(
    "deidentify_duration_seconds",
    "Time to de-identify one instance, by outcome.",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
FORWARD_DURATION: Final = Histogram(
    "forward_duration_seconds",
    "Time of one C-STORE attempt to a destination, by outcome.",
    ["destination", "outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
CUT_THROUGH: Final = Counter(
    "cut_through",
    "Large instances offered for forwarding while they arrive, by outcome: "
    "forwarded, declined (normal path from the start) or abandoned (a request "
    "left unfinished and its association aborted).",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
FORWARD_RETRIES: Final = Counter(
    "forward_retries",
    "Forward attempts repeated after a failure, by destination.",
    ["destination"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
SPOOL_ENTRIES: Final = Gauge(
    "spool_entries",
    "Instances waiting in the spool.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
SPOOL_OLDEST_AGE: Final = Gauge(
    "spool_oldest_entry_age_seconds",
    "Age of the oldest instance waiting in the spool; 0 when it is empty.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
QUARANTINE_ENTRIES: Final = Gauge(
    "quarantine_entries",
    "Instances currently held in quarantine.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
DESTINATION_UP: Final = Gauge(
    "destination_up",
    "1 if the destination answered the last periodic C-ECHO, else 0.",
    ["destination"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)


# --- helpers the node calls ----------------------------------------------------


def set_build_info(version: str, profiles: Mapping[str, str]) -> None:
    """Publish the version and the loaded profiles (name to SHA-256 of content).

    Profile names come from the configuration and must be plain names; the
    hash must be 64 lowercase hex digits.
    """
    BUILD_INFO.clear()
    for name, digest in profiles.items():
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError("profile name is not a plain name")
        if not _SHA256_HEX.fullmatch(digest):
            raise ValueError("profile hash is not a lowercase hex SHA-256")
        BUILD_INFO.labels(version=version, profile=name, profile_sha256=digest).set(1)


def registered_destinations() -> frozenset[str]:
    """The destination names declared by :func:`register_destinations`."""
    return _destinations


def register_destinations(names: Iterable[str]) -> None:
    """Declare the configured destinations; call once at start-up.

    Only these names are used as ``destination`` label values. Each gets a
    ``destination_up`` series at 0 until its first successful C-ECHO.
    """
    global _destinations
    checked = frozenset(names)
    for name in checked:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError("destination name is not a plain name")
    with _destinations_lock:
        for old in _destinations - checked:
            DESTINATION_UP.remove(old)
        _destinations = checked
    for name in checked:
        DESTINATION_UP.labels(destination=name)


def record_association_accepted() -> None:
    """Count one accepted association."""
    ASSOCIATIONS_ACCEPTED.inc()


def record_association_rejected(reason: str) -> None:
    """Count one rejected association; ``reason`` is one of ASSOCIATION_REJECT_REASONS."""
    label = _bounded("association_reject_reason", reason, ASSOCIATION_REJECT_REASONS)
    ASSOCIATIONS_REJECTED.labels(reason=label).inc()


def record_received(sop_class_uid: str | None, size_bytes: int) -> None:
    """Count one instance received into the spool and its size."""
    INSTANCES_RECEIVED.labels(sop_class=sop_class_label(sop_class_uid)).inc()
    RECEIVED_BYTES.inc(max(size_bytes, 0))


def record_refused(sop_class_uid: str | None, reason: str) -> None:
    """Count one C-STORE answered with a failure status; nothing of it was kept."""
    INSTANCES_REFUSED.labels(sop_class=sop_class_label(sop_class_uid), reason=reason_label(reason)).inc()


def record_deidentified(
    outcome: str,
    *,
    sop_class_uid: str | None,
    image_type: str | None,
    reason: str | None,
    duration_seconds: float,
) -> None:
    """Record the engine's verdict on one instance.

    ``outcome`` is the ``Outcome`` value (``passed``, ``dropped`` or
    ``quarantined``). Dropped and quarantined instances are counted here;
    passed ones are counted per destination by :func:`record_forward_attempt`.
    """
    outcome_label = _bounded("outcome", outcome, DEID_OUTCOMES)
    DEIDENTIFY_DURATION.labels(outcome=outcome_label).observe(max(duration_seconds, 0.0))
    labels = {
        "sop_class": sop_class_label(sop_class_uid),
        "image_type": image_type_label(image_type),
        "reason": reason_label(reason),
    }
    if outcome_label == "dropped":
        INSTANCES_DROPPED.labels(**labels).inc()
    elif outcome_label == "quarantined":
        INSTANCES_QUARANTINED.labels(**labels).inc()


def record_quarantined(*, sop_class_uid: str | None, image_type: str | None, reason: str) -> None:
    """Count an instance quarantined outside the engine (e.g. ``retries-exhausted``)."""
    INSTANCES_QUARANTINED.labels(
        sop_class=sop_class_label(sop_class_uid),
        image_type=image_type_label(image_type),
        reason=reason_label(reason),
    ).inc()


def record_forward_attempt(
    destination: str,
    *,
    success: bool,
    duration_seconds: float,
    sop_class_uid: str | None = None,
    image_type: str | None = None,
    size_bytes: int = 0,
    retry: bool = False,
) -> None:
    """Record one C-STORE attempt to ``destination``.

    On success the instance counts as forwarded and its bytes as forwarded
    bytes. ``retry`` is true for every attempt after the first one.
    """
    dest = destination_label(destination)
    outcome = "success" if success else "failure"
    FORWARD_DURATION.labels(destination=dest, outcome=outcome).observe(max(duration_seconds, 0.0))
    if retry:
        FORWARD_RETRIES.labels(destination=dest).inc()
    if success:
        INSTANCES_FORWARDED.labels(
            sop_class=sop_class_label(sop_class_uid),
            image_type=image_type_label(image_type),
            destination=dest,
        ).inc()
        FORWARDED_BYTES.labels(destination=dest).inc(max(size_bytes, 0))


def record_cut_through(outcome: str) -> None:
    """Count one outcome of forwarding an instance while it arrives."""
    CUT_THROUGH.labels(outcome=_bounded("outcome", outcome, ("forwarded", "declined", "abandoned"))).inc()


def set_destination_up(destination: str, up: bool) -> None:
    """Publish the result of the latest periodic C-ECHO to ``destination``."""
    DESTINATION_UP.labels(destination=destination_label(destination)).set(1 if up else 0)


def set_spool_state(entries: int, oldest_age_seconds: float) -> None:
    """Set the spool gauges directly (alternative to :func:`watch_spool`, whose
    callbacks this replaces: a gauge read by a callback ignores ``set``)."""
    watch_spool(lambda: float(entries), lambda: float(oldest_age_seconds))


def watch_spool(entries: Callable[[], float], oldest_age_seconds: Callable[[], float]) -> None:
    """Have the spool gauges read by the callbacks at every scrape.

    The callbacks run on the HTTP server's thread and must be cheap and
    thread-safe.
    """
    SPOOL_ENTRIES.set_function(entries)
    SPOOL_OLDEST_AGE.set_function(oldest_age_seconds)


def watch_receiver_process(pid: Callable[[], int | None]) -> None:
    """Export the receiving process's CPU time and memory, read from ``/proc``
    at every scrape (``deid_gateway_receiver_process_*``)."""
    global _receiver_pid
    _receiver_pid = pid


def watch_quarantine(entries: Callable[[], float]) -> None:
    """Have the quarantine gauge read by ``entries`` at every scrape."""
    QUARANTINE_ENTRIES.set_function(entries)


def set_quarantine_entries(entries: int) -> None:
    """Set the quarantine gauge directly (alternative to :func:`watch_quarantine`,
    whose callback this replaces)."""
    watch_quarantine(lambda: float(entries))

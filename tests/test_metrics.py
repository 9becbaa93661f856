"""Metrics: names, bounded labels, and the helpers the node records through."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from gateway import metrics

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
PLANTED = ["DOE^JANE", "PAT-7734-XYZ", "1.2.826.0.1.3680043.99.12345.678"]


def value(name: str, **labels: str) -> float:
    found = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


def exposition() -> str:
    return generate_latest(metrics.REGISTRY).decode()


@pytest.fixture(autouse=True)
def destinations() -> None:
    metrics.register_destinations(["PACS_A", "ARCHIVE"])


def test_every_gateway_metric_follows_the_naming_rules() -> None:
    families = [f for f in metrics.REGISTRY.collect() if f.name.startswith("deid_gateway_")]
    assert len(families) >= 17
    for family in families:
        assert re.fullmatch(r"deid_gateway_[a-z0-9_]+", family.name)
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client appends it
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
        if "bytes" in family.name:
            assert family.name.endswith("_bytes")


def test_sop_class_label_keeps_standard_classes_and_nothing_else() -> None:
    assert metrics.sop_class_label(WSI) == "VLWholeSlideMicroscopyImageStorage"
    assert metrics.sop_class_label("1.2.840.10008.5.1.4.1.1.7") == "SecondaryCaptureImageStorage"
    assert metrics.sop_class_label("1.2.840.10008.1.2.1") == "other"  # a transfer syntax
    assert metrics.sop_class_label("1.2.826.0.1.3680043.99.12345.678") == "other"
    assert metrics.sop_class_label(None) == "other"


def test_values_outside_the_allowed_set_become_other_and_are_counted() -> None:
    before = value("deid_gateway_label_values_rejected_total", label="reason")
    assert metrics.reason_label("label-image") == "label-image"
    assert metrics.reason_label("DOE^JANE") == "other"
    assert metrics.reason_label(None) == "none"
    assert value("deid_gateway_label_values_rejected_total", label="reason") == before + 1
    assert metrics.image_type_label("VOLUME") == "VOLUME"
    assert metrics.image_type_label(None) == "none"
    assert metrics.image_type_label("PAT-7734-XYZ") == "other"
    assert metrics.destination_label("PACS_A") == "PACS_A"
    assert metrics.destination_label("SOMEWHERE") == "other"


def test_received_dropped_quarantined_and_forwarded_are_counted() -> None:
    sop = "VLWholeSlideMicroscopyImageStorage"
    received = value("deid_gateway_instances_received_total", sop_class=sop)
    received_bytes = value("deid_gateway_received_bytes_total")
    dropped = value(
        "deid_gateway_instances_dropped_total",
        sop_class=sop,
        image_type="LABEL",
        reason="label-image",
    )
    forwarded = value(
        "deid_gateway_instances_forwarded_total",
        sop_class=sop,
        image_type="VOLUME",
        destination="PACS_A",
    )
    quarantined = value(
        "deid_gateway_instances_quarantined_total",
        sop_class=sop,
        image_type="VOLUME",
        reason="retries-exhausted",
    )
    retries = value("deid_gateway_forward_retries_total", destination="PACS_A")

    metrics.record_received(WSI, 1000)
    metrics.record_received(WSI, 500)
    metrics.record_deidentified(
        "dropped",
        sop_class_uid=WSI,
        image_type="LABEL",
        reason="label-image",
        duration_seconds=0.01,
    )
    metrics.record_deidentified(
        "passed", sop_class_uid=WSI, image_type="VOLUME", reason=None, duration_seconds=0.2
    )
    metrics.record_forward_attempt(
        "PACS_A", success=False, duration_seconds=1.0, sop_class_uid=WSI, image_type="VOLUME"
    )
    metrics.record_forward_attempt(
        "PACS_A",
        success=True,
        duration_seconds=0.5,
        sop_class_uid=WSI,
        image_type="VOLUME",
        size_bytes=400,
        retry=True,
    )
    metrics.record_quarantined(sop_class_uid=WSI, image_type="VOLUME", reason="retries-exhausted")

    assert value("deid_gateway_instances_received_total", sop_class=sop) == received + 2
    assert value("deid_gateway_received_bytes_total") == received_bytes + 1500
    assert (
        value(
            "deid_gateway_instances_dropped_total",
            sop_class=sop,
            image_type="LABEL",
            reason="label-image",
        )
        == dropped + 1
    )
    assert (
        value(
            "deid_gateway_instances_forwarded_total",
            sop_class=sop,
            image_type="VOLUME",
            destination="PACS_A",
        )
        == forwarded + 1
    )
    assert (
        value(
            "deid_gateway_instances_quarantined_total",
            sop_class=sop,
            image_type="VOLUME",
            reason="retries-exhausted",
        )
        == quarantined + 1
    )
    assert value("deid_gateway_forward_retries_total", destination="PACS_A") == retries + 1
    assert value("deid_gateway_forwarded_bytes_total", destination="PACS_A") >= 400
    assert (
        value(
            "deid_gateway_forward_duration_seconds_count", destination="PACS_A", outcome="failure"
        )
        >= 1
    )
    assert value("deid_gateway_deidentify_duration_seconds_count", outcome="passed") >= 1


def test_associations_by_reason() -> None:
    accepted = value("deid_gateway_associations_accepted_total")
    metrics.record_association_accepted()
    metrics.record_association_rejected("calling-ae-not-allowed")
    metrics.record_association_rejected("DOE^JANE")
    assert value("deid_gateway_associations_accepted_total") == accepted + 1
    assert value("deid_gateway_associations_rejected_total", reason="calling-ae-not-allowed") >= 1
    assert value("deid_gateway_associations_rejected_total", reason="other") >= 1


def test_gauges_set_directly_and_by_callback() -> None:
    metrics.set_destination_up("PACS_A", True)
    metrics.set_destination_up("ARCHIVE", False)
    assert value("deid_gateway_destination_up", destination="PACS_A") == 1
    assert value("deid_gateway_destination_up", destination="ARCHIVE") == 0

    metrics.set_quarantine_entries(3)
    assert value("deid_gateway_quarantine_entries") == 3
    depth = [7]
    metrics.watch_spool(lambda: depth[0], lambda: 42.5)
    metrics.watch_quarantine(lambda: 2)
    assert value("deid_gateway_spool_entries") == 7
    depth[0] = 9
    assert value("deid_gateway_spool_entries") == 9
    assert value("deid_gateway_spool_oldest_entry_age_seconds") == 42.5
    assert value("deid_gateway_quarantine_entries") == 2


def test_registering_destinations_replaces_the_old_ones() -> None:
    metrics.register_destinations(["NEW_ONE"])
    text = exposition()
    assert 'deid_gateway_destination_up{destination="NEW_ONE"} 0.0' in text
    assert 'destination_up{destination="ARCHIVE"}' not in text
    with pytest.raises(ValueError):
        metrics.register_destinations(["DOE^JANE"])


def test_build_info_carries_version_and_profile_hashes() -> None:
    digest = "0123456789abcdef" * 4
    metrics.set_build_info("1.2.3", {"research": digest})
    assert (
        value("deid_gateway_build_info", version="1.2.3", profile="research", profile_sha256=digest)
        == 1
    )
    with pytest.raises(ValueError):
        metrics.set_build_info("1.2.3", {"research": "not-a-hash"})


def test_planted_values_never_reach_the_exposition() -> None:
    for planted in PLANTED:
        metrics.record_received(planted, 1)
        metrics.record_association_rejected(planted)
        metrics.record_deidentified(
            "quarantined",
            sop_class_uid=planted,
            image_type=planted,
            reason=planted,
            duration_seconds=0.1,
        )
        metrics.record_deidentified(
            planted, sop_class_uid=WSI, image_type=None, reason=None, duration_seconds=0.1
        )
        metrics.record_forward_attempt(
            planted, success=True, duration_seconds=0.1, sop_class_uid=planted, image_type=planted
        )
        metrics.record_quarantined(sop_class_uid=planted, image_type=planted, reason=planted)
        metrics.set_destination_up(planted, True)
    text = exposition()
    for planted in PLANTED:
        assert planted not in text
    assert 'reason="other"' in text


def _engine_reason_codes() -> set[str]:
    """Every reason code literal the engine passes to ``report.stop``, ``_refuse`` or ``Verdict``."""
    codes: set[str] = set()
    for path in (Path(metrics.__file__).parent / "deid").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in {"stop", "_refuse", "Verdict"}:
                continue
            for arg in node.args:
                if (
                    isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and re.fullmatch(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*", arg.value)
                ):
                    codes.add(arg.value)
    return codes


def test_every_engine_reason_code_is_an_allowed_label_and_log_value() -> None:
    from gateway.logs import FIELD_RULES
    from gateway.redact import RedactionReason

    codes = _engine_reason_codes() | {reason.value for reason in RedactionReason}
    assert {"label-image", "burned-in-annotation-unknown", "missing-sop-uids"} <= codes
    assert codes <= metrics.INSTANCE_REASONS, codes - metrics.INSTANCE_REASONS
    for code in codes:
        assert metrics.reason_label(code) == code
        assert FIELD_RULES["reason"](code)
    assert not FIELD_RULES["reason"]("DOE^JANE")

"""Operations end to end: the real node, real peers, and what an operator sees.

``deid-gateway serve`` runs as a subprocess forwarding to dcmtk's storescp and to
a folder. dcmtk's storescu sends a synthetic study full of planted values, and a
caller not on the allowlist tries too. The test then reads ``/metrics``,
``/readyz``, the node's log output and the audit trail, and checks that the
counts match what was sent, that readiness follows the archive going down, that
no planted value or original UID appears anywhere, and that the audit chain
detects an edited record.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage, VLWholeSlideMicroscopyImageStorage

from gateway.deid import generate_key_file
from gateway.synthetic import PlantedPHI, write_study
from tests.peers import Gateway, Storescp, free_port, storescu

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.1)


def expected_fate(path: Path) -> tuple[str, str | None]:
    """What the research profile must do with a file of the synthetic study, and why."""
    ds = dcmread(path, stop_before_pixels=True)
    image_type = {str(v) for v in ds.get("ImageType", [])}
    if "LABEL" in image_type:
        return "dropped", "label-image"
    if "OVERVIEW" in image_type:
        return "dropped", "overview-image"
    if ds.SOPClassUID == SecondaryCaptureImageStorage:
        burned_in = ds.get("BurnedInAnnotation")
        if burned_in is None:
            return "quarantined", "burned-in-annotation-unknown"
        if burned_in == "YES":
            return "quarantined", "burned-in-annotation"
    return "forwarded", None


def test_metrics_readiness_logs_and_audit_of_a_running_node(tmp_path: Path) -> None:
    phi = PlantedPHI.create(11)
    files = write_study(tmp_path / "study", phi, slides=2).all_files()
    fates = {path: expected_fate(path) for path in files}
    counts = Counter(fate for fate, _ in fates.values())
    reasons = Counter(reason for _, reason in fates.values() if reason)
    assert counts["forwarded"] and counts["dropped"] and counts["quarantined"]
    original_uids: set[str] = set()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        original_uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    secrets = set(phi.all_tokens()) | original_uids

    key_file = tmp_path / "gateway.key"
    generate_key_file(key_file)
    storescp = Storescp(tmp_path / "pacs", ae_title="PACS").start()
    metrics_port = free_port()
    gateway = Gateway(tmp_path / "gw", {
        "allowed_callers": [{"ae_title": "SCANNER", "hosts": ["127.0.0.1"]}],
        "spool_dir": "data/spool",
        "key_file": str(key_file),
        "profile": "research",
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port},
            {"name": "folder", "folder": "archive"},
        ],
        "forwarding": {"workers": 2, "max_attempts": 50, "backoff_initial": 0.2,
                       "backoff_max": 1.0, "echo_interval": 0.5},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    })
    base = f"http://127.0.0.1:{metrics_port}"
    scrapes: list[str] = []

    def scrape() -> Samples:
        status, text = http_get(f"{base}/metrics")
        assert status == 200
        scrapes.append(text)
        return parse(text)

    try:
        gateway.start()
        wait_until(lambda: http_get(f"{base}/readyz")[0] == 200, 20)
        assert http_get(f"{base}/healthz")[0] == 200

        sent = storescu(gateway.port, files)
        assert sent.returncode == 0, sent.stderr
        intruder = storescu(gateway.port, files[:1], calling="INTRUDER")
        assert intruder.returncode != 0

        def settled() -> bool:
            samples = scrape()
            done = (
                total(samples, "deid_gateway_instances_forwarded_total", destination="pacs")
                + total(samples, "deid_gateway_instances_dropped_total")
                + total(samples, "deid_gateway_instances_quarantined_total")
            )
            return done >= len(files) and total(samples, "deid_gateway_spool_entries") == 0

        wait_until(settled, 30)
        samples = scrape()
        m = lambda name, **labels: total(samples, name, **labels)  # noqa: E731

        assert m("deid_gateway_associations_accepted_total") == 1
        assert m("deid_gateway_associations_rejected_total", reason="calling-ae-not-allowed") == 1
        assert m("deid_gateway_associations_rejected_total") == 1
        assert m("deid_gateway_instances_received_total") == len(files)
        assert m("deid_gateway_instances_received_total",
                 sop_class="VLWholeSlideMicroscopyImageStorage") == sum(
            1 for p in files
            if dcmread(p, stop_before_pixels=True).SOPClassUID == VLWholeSlideMicroscopyImageStorage)
        for dest in ("pacs", "folder"):
            assert m("deid_gateway_instances_forwarded_total", destination=dest) == counts["forwarded"]
            assert m("deid_gateway_forwarded_bytes_total", destination=dest) > 0
            assert m("deid_gateway_forward_duration_seconds_count", destination=dest,
                     outcome="success") == counts["forwarded"]
            assert m("deid_gateway_destination_up", destination=dest) == 1
        assert m("deid_gateway_instances_dropped_total") == counts["dropped"]
        assert m("deid_gateway_instances_dropped_total", reason="label-image",
                 image_type="LABEL") == reasons["label-image"] == 2
        assert m("deid_gateway_instances_dropped_total", reason="overview-image",
                 image_type="OVERVIEW") == reasons["overview-image"] == 2
        assert m("deid_gateway_instances_quarantined_total") == counts["quarantined"]
        for reason in ("burned-in-annotation", "burned-in-annotation-unknown"):
            assert m("deid_gateway_instances_quarantined_total", reason=reason, image_type="none",
                     sop_class="SecondaryCaptureImageStorage") == reasons[reason] == 1
        assert m("deid_gateway_quarantine_entries") == counts["quarantined"]
        assert m("deid_gateway_received_bytes_total") >= sum(p.stat().st_size for p in files)
        assert m("deid_gateway_deidentify_duration_seconds_count") == len(files)
        assert m("deid_gateway_deidentify_duration_seconds_sum") > 0
        assert m("deid_gateway_forward_retries_total") == 0
        assert m("deid_gateway_spool_entries") == 0
        assert m("deid_gateway_spool_oldest_entry_age_seconds") == 0
        assert m("deid_gateway_label_values_rejected_total") == 0
        build = [ls for (n, ls), v in samples.items() if n == "deid_gateway_build_info" and v == 1]
        assert len(build) == 1
        build_labels = dict(build[0])
        assert build_labels["profile"] == "research"
        assert len(build_labels["profile_sha256"]) == 64

        storescp.stop()
        wait_until(lambda: http_get(f"{base}/readyz")[0] == 503, 10)
        status, body = http_get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body)["failing"] == ["destination:pacs"]
        samples = scrape()
        assert total(samples, "deid_gateway_destination_up", destination="pacs") == 0
        assert total(samples, "deid_gateway_destination_up", destination="folder") == 1
    finally:
        gateway.stop()
        storescp.stop()
    assert gateway.proc is not None and gateway.proc.returncode == 0

    log_text = gateway.log.read_text()
    for text in [log_text, *scrapes]:
        leaked = sorted(secret for secret in secrets if secret in text)
        assert not leaked, f"{len(leaked)} planted values or original UIDs leaked"
    events = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    own = [e for e in events if str(e.get("logger", "")).startswith("gateway")]
    assert own and not [e for e in own if "[redacted]" in e.values()]
    instance_events = [e for e in events if str(e.get("event", "")).startswith("instance.")]
    assert Counter(e["event"] for e in instance_events) == {
        "instance.received": len(files),
        "instance.forwarded": 2 * counts["forwarded"],
        "instance.delivered": counts["forwarded"],
        "instance.dropped": counts["dropped"],
        "instance.quarantined": counts["quarantined"],
    }
    for event in instance_events:
        assert {"assoc_id", "calling_ae", "sop_class", "outcome"} <= event.keys(), event
        assert event["calling_ae"] == "SCANNER" and event["assoc_id"] >= 1
        assert any(key.endswith("_seconds") for key in event), event
        assert "redacted_fields" not in event

    config = gateway.directory / "gateway.yaml"
    audit_db = gateway.directory / "data" / "audit.sqlite"
    assert audit_db.stat().st_mode & 0o777 == 0o600

    def audit(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "DEID_GATEWAY_AUDIT_DB"}
        return subprocess.run(
            [sys.executable, "-m", "gateway", "audit", *args, "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False, env=env,
        )

    verified = audit("verify")
    assert verified.returncode == 0, verified.stderr
    shown = audit("show", "--limit", "1000")
    records = [json.loads(line) for line in shown.stdout.splitlines()]
    assert Counter(r["outcome"] for r in records) == {
        "forwarded": 2 * counts["forwarded"],
        "dropped": counts["dropped"],
        "quarantined": counts["quarantined"],
    }
    for record in records:
        assert record["calling_ae"] == "SCANNER"
        assert record["profile"] == "research"
        assert record["profile_sha256"] == build_labels["profile_sha256"]
        assert len(record["input_sha256"]) == 64
    forwarded = [r for r in records if r["outcome"] == "forwarded"]
    assert {r["destination"] for r in forwarded} == {"pacs", "folder"}
    assert all(r["delivered_at"] and r["new_sop_instance_uid"] for r in forwarded)
    assert all(json.loads(r["action_counts"]) for r in forwarded)
    audit_text = audit_db.read_bytes().decode("latin-1") + shown.stdout
    assert not [secret for secret in secrets if secret in audit_text]

    with sqlite3.connect(audit_db) as db:
        db.execute("UPDATE audit_records SET outcome = 'forwarded' WHERE outcome = 'dropped'")
    broken = audit("verify")
    assert broken.returncode == 1
    assert "BROKEN" in broken.stderr


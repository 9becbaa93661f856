"""The Grafana dashboard and the alert rules use only metrics the gateway exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway import metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "deid-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

METRIC = re.compile(r"\bdeid_gateway_[a-z0-9_]*[a-z0-9]\b")
SELECTOR = re.compile(r"\b(deid_gateway_[a-z0-9_]*[a-z0-9])\{([^}]*)\}")
#: Labels Prometheus adds at scrape time.
TARGET_LABELS = {"instance", "job"}
DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w|y))+")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def exported() -> dict[str, frozenset[str]]:
    """Every series name the gateway's metrics can expose, with its label names."""
    names: dict[str, frozenset[str]] = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            labels = frozenset(obj._labelnames)
            for suffix in SUFFIXES[obj._type]:
                extra = {"le"} if suffix == "_bucket" else set()
                names[obj._name + suffix] = labels | extra
    return names


def dashboard_queries() -> Iterator[str]:
    def walk(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"expr", "definition"} and isinstance(value, str):
                    yield value
                elif key == "query" and isinstance(value, str | dict):
                    yield from (
                        [value] if isinstance(value, str) else walk({"expr": value.get("query")})
                    )
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return walk(json.loads(DASHBOARD.read_text()))


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def check_expression(expr: str, names: dict[str, frozenset[str]]) -> None:
    used = METRIC.findall(expr)
    unknown = sorted(set(used) - set(names))
    assert not unknown, f"not exported by gateway/metrics.py: {unknown} in {expr!r}"
    for name, matchers in SELECTOR.findall(expr):
        for matcher in filter(None, (m.strip() for m in matchers.split(","))):
            label = re.split(r"=~|!~|!=|=", matcher, maxsplit=1)[0].strip()
            assert label in names[name] | TARGET_LABELS, f"{name} has no label {label!r}"


def test_the_exported_set_is_what_the_registry_serves() -> None:
    names = exported()
    served = {f.name for f in metrics.REGISTRY.collect() if f.name.startswith("deid_gateway_")}
    assert served  # family names drop the suffixes; each must map onto an exported series
    for family in served:
        assert any(name == family or name.startswith(family + "_") for name in names), family
    assert "deid_gateway_instances_received_total" in names
    assert "deid_gateway_forward_duration_seconds_bucket" in names


def test_the_dashboard_uses_only_exported_metrics_and_labels() -> None:
    names = exported()
    queries = list(dashboard_queries())
    assert len(queries) >= 15
    for query in queries:
        check_expression(query, names)
    used = {m for q in queries for m in METRIC.findall(q)}
    base = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    # every must-have metric of the issue is on the dashboard
    for required in [
        "deid_gateway_associations_accepted_total",
        "deid_gateway_associations_rejected_total",
        "deid_gateway_instances_received_total",
        "deid_gateway_instances_forwarded_total",
        "deid_gateway_instances_dropped_total",
        "deid_gateway_instances_quarantined_total",
        "deid_gateway_received_bytes_total",
        "deid_gateway_forwarded_bytes_total",
        "deid_gateway_deidentify_duration_seconds",
        "deid_gateway_forward_duration_seconds",
        "deid_gateway_spool_entries",
        "deid_gateway_spool_oldest_entry_age_seconds",
        "deid_gateway_forward_retries_total",
        "deid_gateway_destination_up",
        "deid_gateway_build_info",
    ]:
        assert required in base, required


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])


def test_alert_rules_use_only_exported_metrics_and_labels() -> None:
    names = exported()
    for rule in alert_rules():
        check_expression(str(rule["expr"]), names)


def test_alert_rules_cover_the_required_conditions() -> None:
    rules = {str(rule["alert"]): rule for rule in alert_rules()}
    expressions = {name: str(rule["expr"]) for name, rule in rules.items()}
    assert "deid_gateway_spool_entries" in expressions["DeidGatewaySpoolGrowing"]
    assert "deid_gateway_quarantine_entries" in expressions["DeidGatewayQuarantineNotEmpty"]
    assert "deid_gateway_destination_up" in expressions["DeidGatewayDestinationDown"]
    assert 'outcome="failure"' in expressions["DeidGatewayForwardErrors"]
    assert "deid_gateway_instances_quarantined_total" in expressions["DeidGatewayHighQuarantineRate"]
    assert "deid_gateway_instances_received_total" in expressions["DeidGatewayNoTraffic"]


def test_alert_rules_have_valid_structure() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    group_names = [group["name"] for group in document["groups"]]
    assert len(group_names) == len(set(group_names))
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "for" in rule:
                assert DURATION.fullmatch(rule["for"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"]
            assert rule["expr"].count("(") == rule["expr"].count(")")


def test_promtool_accepts_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr

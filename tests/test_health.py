"""The health server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import metrics
from gateway.health import HealthServer, writable_directory_check


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture
def server() -> Iterator[HealthServer]:
    with HealthServer("127.0.0.1", 0) as running:
        yield running


def test_healthz_answers(server: HealthServer) -> None:
    assert get(f"{server.url}/healthz")[0] == 200


def test_metrics_serves_the_gateway_registry(server: HealthServer) -> None:
    metrics.record_association_accepted()
    status, content_type, body = get(f"{server.url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "deid_gateway_associations_accepted_total" in body
    assert "deid_gateway_spool_entries" in body


def test_readyz_is_ready_with_no_failing_check(server: HealthServer, tmp_path: Path) -> None:
    server.add_check("listening", lambda: True)
    server.add_check("spool-writable", writable_directory_check(tmp_path))
    status, _, body = get(f"{server.url}/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "ready", "failing": []}
    assert list(tmp_path.iterdir()) == []  # the probe file is removed


def test_readyz_names_failing_checks_and_no_values(server: HealthServer, tmp_path: Path) -> None:
    def explodes() -> bool:
        raise RuntimeError("cannot reach DOE^JANE")

    server.add_check("listening", lambda: True)
    server.add_check("key-loaded", lambda: False)
    server.add_check("destination:pacs_a", explodes)
    server.add_check("spool-writable", writable_directory_check(tmp_path / "gone"))
    status, _, body = get(f"{server.url}/readyz")
    assert status == 503
    assert json.loads(body) == {
        "status": "not ready",
        "failing": ["destination:pacs_a", "key-loaded", "spool-writable"],
    }
    assert "DOE" not in body

    server.remove_check("key-loaded")
    server.remove_check("destination:pacs_a")
    (tmp_path / "gone").mkdir()
    assert get(f"{server.url}/readyz")[0] == 200


def test_check_names_must_be_plain(server: HealthServer) -> None:
    with pytest.raises(ValueError):
        server.add_check("DOE^JANE", lambda: True)


def test_unknown_paths_are_404(server: HealthServer) -> None:
    assert get(f"{server.url}/secrets")[0] == 404


def test_stop_releases_the_port() -> None:
    server = HealthServer("127.0.0.1", 0)
    server.start()
    port = server.port
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    server.stop()
    with pytest.raises(RuntimeError):
        _ = server.port
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    server.stop()  # a second stop is harmless

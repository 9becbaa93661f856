"""The operators' commands against a real node and a real archive:
``quarantine list|show|release|purge`` and ``echo``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.synthetic import PlantedPHI, write_slide
from tests.peers import Gateway, Storescp, free_port, storescu

pytestmark = pytest.mark.integration


def cli(config: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", command, "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def wait_for(predicate: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_quarantine_commands_and_echo(tmp_path: Path) -> None:
    phi = PlantedPHI.create(seed=31)
    files = write_slide(tmp_path / "slide", phi, levels=1, label=False, overview=False)
    archive = Storescp(tmp_path / "archive", port=free_port())
    config = {
        "allowed_callers": [{"ae_title": "*", "hosts": ["127.0.0.1"]}],
        "spool_dir": "spool",
        "quarantine_dir": "quarantine",
        "key_file": "gateway.key",
        "profile": "research",
        "destinations": [{"name": "pacs", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}],
        "forwarding": {"max_attempts": 1, "backoff_initial": 0.05, "echo_interval": 0.5},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
    }
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "gateway.key").write_text("cd" * 32)
    gateway = Gateway(tmp_path / "node", config).start()
    yaml_path = tmp_path / "node" / "gateway.yaml"
    try:
        # The archive is down: echo fails, and after its one attempt the instance is quarantined.
        down = cli(yaml_path, "echo")
        assert down.returncode == 1
        assert storescu(gateway.port, files).returncode == 0
        wait_for(lambda: len(cli(yaml_path, "quarantine", "list").stdout.splitlines()) == len(files))
        listing = cli(yaml_path, "quarantine", "list")
        entry_id = listing.stdout.split()[0]
        assert "retries-exhausted" in listing.stdout
        shown = cli(yaml_path, "quarantine", "show", entry_id)
        assert shown.returncode == 0 and json.loads(shown.stdout)["reason"]["code"] == "retries-exhausted"
        for token in phi.all_tokens():
            assert token not in listing.stdout + shown.stdout
        # The archive is back: echo passes; released entries are delivered after a restart.
        archive.start()
        assert cli(yaml_path, "echo").returncode == 0
        gateway.stop()
        released = cli(yaml_path, "quarantine", "release", "--all")
        assert released.returncode == 0, released.stderr
        assert cli(yaml_path, "quarantine", "list").stdout.strip() == ""
        gateway = Gateway(tmp_path / "node", config).start()
        wait_for(lambda: len(archive.files()) == len(files))
        # Purge: with the archive down again, a new instance is quarantined, then removed for good.
        archive.stop()
        assert storescu(gateway.port, files[:1]).returncode == 0
        wait_for(lambda: cli(yaml_path, "quarantine", "list").stdout.strip() != "")
        entry_id = cli(yaml_path, "quarantine", "list").stdout.split()[0]
        assert cli(yaml_path, "quarantine", "purge", entry_id).returncode == 0
        assert not (tmp_path / "node" / "quarantine" / entry_id).exists()
    finally:
        gateway.stop()
        archive.stop()
    assert cli(yaml_path, "quarantine", "list").stdout.strip() == ""

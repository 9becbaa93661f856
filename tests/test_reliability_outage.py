"""The archive is down while 500 instances arrive; all reach it once it is back.

Meanwhile the spool holds the backlog, ``deid_gateway_spool_entries`` shows it,
and ``/readyz`` names the destination as down (the periodic C-ECHO).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from gateway.deid import SecretKey
from gateway.synthetic import PlantedPHI
from tests.peers import DCMTK_ENV, STORESCP, Gateway, free_port, stop, wait_for_port
from tests.reliability import (
    Sender,
    archived,
    expected_uids,
    gateway_config,
    make_instances,
    metric,
    readiness,
    wait_until,
)

INSTANCES = 500


@pytest.mark.integration
def test_archive_outage_backlog_is_visible_and_delivered_after_return(
    tmp_path: Path, key: SecretKey, key_file: Path
) -> None:
    files = make_instances(tmp_path / "in", INSTANCES, PlantedPHI.create(72))
    expected = set(expected_uids(files, key, tmp_path / "scratch.dcm").values())
    scp_port, metrics_port = free_port(), free_port()
    base = f"http://127.0.0.1:{metrics_port}"
    gateway = Gateway(tmp_path / "gw", gateway_config(
        tmp_path / "gw", key_file,
        [{"name": "pacs", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": scp_port}],
        metrics={"host": "127.0.0.1", "port": metrics_port},
        forwarding={"workers": 2, "max_attempts": 1000, "backoff_initial": 1.0,
                    "backoff_max": 8.0, "echo_interval": 0.5},
    ))
    scp: subprocess.Popen[bytes] | None = None
    try:
        gateway.start()
        started = time.monotonic()
        sender = Sender(gateway.port, files, per_association=INSTANCES).start()
        assert sender.wait_done(120), f"{len(sender.acked)} of {INSTANCES} acknowledged"
        sender.stop()
        received = time.monotonic() - started
        assert metric(base, "deid_gateway_spool_entries") == INSTANCES
        status, body = readiness(base)
        assert status == 503 and "destination:pacs" in body["failing"], body
        assert metric(base, 'deid_gateway_destination_up{destination="pacs"}') == 0

        (tmp_path / "scp").mkdir()
        scp = subprocess.Popen(
            [STORESCP, "-aet", "ARCHIVE", "-od", str(tmp_path / "scp"), "+uf", str(scp_port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(scp_port, scp)
        back = time.monotonic()
        assert wait_until(lambda: metric(base, "deid_gateway_spool_entries") == 0, 120)
        drained = time.monotonic() - back
        assert wait_until(lambda: readiness(base)[0] == 200, 10), readiness(base)
        assert metric(base, 'deid_gateway_destination_up{destination="pacs"}') == 1
    finally:
        gateway.stop()
        stop(scp)
    arrivals = archived([tmp_path / "scp"])
    assert {uid for uid, _ in arrivals} == expected
    assert len(arrivals) == INSTANCES, "an instance was delivered twice without any crash"
    assert list((tmp_path / "gw" / "quarantine").iterdir()) == []
    print(f"{INSTANCES} received in {received:.1f} s with the archive down, "
          f"delivered in {drained:.1f} s after it returned")

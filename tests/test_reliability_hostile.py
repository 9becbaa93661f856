"""Hostile input: the malformed corpus through the engine and through a running node.

Before answering a C-STORE the node runs the engine's own parse and structure
checks (``check_file``) on the received file: a data set that cannot be read
is answered 0xC210 and removed, one whose SOP Class or Instance UID
contradicts the request 0xA900 (see docs/network.md, "Malformed data sets").
A data set that parses but is not fit to forward (an empty one, a value with
the wrong VR) is acknowledged and then held in quarantine by the engine with a
reason. What must never happen: a crash, a hang, an exception out of the
engine, or anything forwarded.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import metrics
from gateway.config import parse_config
from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.deid.stream import check_file
from gateway.node import Node
from gateway.receive import STATUS_DATA_SET_MISMATCH, STATUS_MALFORMED
from tests.fuzz.make_corpus import CORPUS, huge_value, part10, write_corpus
from tests.logcapture import captured_logs
from tests.reliability import CALLING, send_one, wait_until

ENGINE_PASSES: dict[str, str] = {}
CASES = sorted(CORPUS.glob("*.dcm"))
ENGINE_CASES = [
    pytest.param(p, id=p.stem, marks=pytest.mark.xfail(strict=True, reason=ENGINE_PASSES[p.stem]))
    if p.stem in ENGINE_PASSES else pytest.param(p, id=p.stem)
    for p in CASES
]
#: Cases whose data set parses: the node acknowledges them and the engine
#: quarantines them with this reason (none left: every case is refused at receipt).
PARSED: dict[str, str] = {}
#: The data set names another instance than the C-STORE request (and its File Meta).
MISMATCHED = {"meta-other-instance"}


@pytest.fixture(scope="module")
def deid() -> Deidentifier:
    return Deidentifier(load_profile("research"), SecretKey(b"k" * 32))


def test_the_committed_corpus_is_what_the_script_writes(tmp_path: Path) -> None:
    written = write_corpus(tmp_path)
    assert sorted(p.name for p in written) == [p.name for p in CASES]
    for path in written:
        assert path.read_bytes() == (CORPUS / path.name).read_bytes(), path.name


@pytest.mark.parametrize("case", ENGINE_CASES)
def test_engine_quarantines_each_malformed_case_without_writing(
    deid: Deidentifier, case: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.dcm"
    started = time.monotonic()
    report = deid.deidentify_file(case, out)
    assert time.monotonic() - started < 10
    assert report.outcome is Outcome.QUARANTINED, (report.outcome, report.reason)
    assert report.reason
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_engine_quarantines_a_100_mb_lo(deid: Deidentifier, tmp_path: Path) -> None:
    src = huge_value(tmp_path / "huge.dcm")
    out = tmp_path / "out.dcm"
    report = deid.deidentify_file(src, out)
    assert report.outcome is not Outcome.PASSED or b"PHIFUZZHUGE" not in out.read_bytes()[:2**20]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), cut=st.integers(min_value=0, max_value=400))
def test_engine_never_raises_and_never_writes_garbage(
    deid: Deidentifier, tmp_path: Path, data: bytes, cut: int
) -> None:
    """Random bytes after a valid File Meta, or a valid file cut and patched with them."""
    base = (CORPUS / "empty-data-set.dcm").read_bytes()
    src, out = tmp_path / "in.dcm", tmp_path / "out.dcm"
    out.unlink(missing_ok=True)
    src.write_bytes(part10(data) if cut % 2 else base[: len(base) - cut % len(base)] + data)
    report = deid.deidentify_file(src, out)
    if report.outcome is not Outcome.PASSED:
        assert not out.exists()


def test_check_file_rejects_every_case_but_those_that_parse() -> None:
    """The node's answers below rest on this split of the corpus."""
    verdicts = {case.stem: check_file(case) for case in CASES}
    assert {stem for stem, problem in verdicts.items() if problem is None} == set(PARSED)
    for stem, problem in verdicts.items():
        assert problem is None or "PHIFUZZ" not in problem, stem


def expected_status(case: Path) -> int:
    if case.stem in PARSED:
        return 0x0000
    return STATUS_DATA_SET_MISMATCH if case.stem in MISMATCHED else STATUS_MALFORMED


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The gateway's JSON log lines, as ``serve`` writes them, for one test."""
    with captured_logs(json=True) as stream:
        yield stream


@pytest.fixture
def node(tmp_path: Path, key_file: Path) -> Iterator[Node]:
    config = parse_config({
        "listen": {"host": "127.0.0.1", "port": 0},
        "allowed_callers": [{"ae_title": CALLING, "hosts": ["127.0.0.1"]}],
        "spool_dir": str(tmp_path / "spool"),
        "key_file": str(key_file),
        "profile": "research",
        "destinations": [{"name": "folder", "folder": str(tmp_path / "archive")}],
        "limits": {"min_free_bytes": 0},
        "forwarding": {"max_attempts": 1, "backoff_initial": 0.1, "backoff_max": 0.1},
    }, tmp_path)
    running = Node(config)
    running.start()
    yield running
    running.stop()


def refused_count(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "deid_gateway_instances_refused_total", {"sop_class": "ComprehensiveSRStorage", "reason": reason}
    )
    return 0.0 if value is None else value


@pytest.mark.integration
def test_node_refuses_each_unreadable_case_and_forwards_nothing(
    log_lines: io.StringIO, node: Node, tmp_path: Path
) -> None:
    assert node.address is not None
    port = node.address[1]
    before = {r: refused_count(r) for r in ("malformed-data-set", "data-set-mismatch")}
    statuses = {}
    for case in CASES:
        started = time.monotonic()
        status = send_one(port, case, timeout=60)
        assert time.monotonic() - started < 60, case.name
        statuses[case.stem] = status
        # Nothing of a refused data set is left on disk.
        assert list(node.spool.incoming.iterdir()) == [], case.name
    assert statuses == {case.stem: expected_status(case) for case in CASES}
    assert wait_until(node.idle, 60)
    assert [p for p in (tmp_path / "archive").rglob("*") if p.is_file()] == []
    held = sorted(node.quarantine.get(i).reason.code for i in node.quarantine.ids())
    assert held == sorted(PARSED.values())
    refused = [c for c in CASES if c.stem not in PARSED]
    assert refused_count("malformed-data-set") - before["malformed-data-set"] == len(refused) - len(
        MISMATCHED)
    assert refused_count("data-set-mismatch") - before["data-set-mismatch"] == len(MISMATCHED)
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    refusals = [line for line in lines if line["event"] == "instance.refused"]
    assert sorted((line["reason"], line["status"]) for line in refusals) == sorted(
        ("data-set-mismatch" if c.stem in MISMATCHED else "malformed-data-set", expected_status(c))
        for c in refused
    )
    assert all("redacted_fields" not in line for line in refusals)
    assert "PHIFUZZ" not in log_lines.getvalue() and "2.25.1700" not in log_lines.getvalue()
    # A 100 MB value in a 64-character VR: answered within a minute, and the
    # value never leaves (the research profile replaces the attribute).
    started = time.monotonic()
    assert send_one(port, huge_value(tmp_path / "huge.dcm"), timeout=60) is not None
    assert wait_until(node.idle, 60) and time.monotonic() - started < 60
    for path in (tmp_path / "archive").rglob("*.dcm"):
        assert b"PHIFUZZ" not in path.read_bytes()
    # Still serving after all of it.
    assert send_one(port, CORPUS / "not-dicom.dcm") == STATUS_MALFORMED
    print(f"{len(CASES)} malformed cases: {len(refused)} refused at receipt "
          f"({sorted({hex(s or 0) for s in statuses.values()})}), {len(held)} quarantined ({held})")

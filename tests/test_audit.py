"""The audit trail: chain integrity, tamper detection, concurrency, storage."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from gateway.audit import AuditEntry, AuditError, AuditTrail, sha256_file
from gateway.commands import audit as audit_command

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def entry(i: int, **changes: object) -> AuditEntry:
    fields: dict[str, object] = {
        "received_at": T0 + timedelta(seconds=i),
        "calling_ae": "SCANNER_1",
        "input_sha256": f"{i:064x}",
        "profile": "research",
        "profile_sha256": "ab" * 32,
        "outcome": "forwarded",
        "new_sop_instance_uid": f"2.25.{1000 + i}",
        "action_counts": {"remove": 12, "replace-uid": 3},
        "destination": "PACS_A",
        "delivered_at": T0 + timedelta(seconds=i, milliseconds=250),
    }
    fields.update(changes)
    return AuditEntry(**fields)  # type: ignore[arg-type]


@pytest.fixture
def trail_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit.sqlite"
    with AuditTrail(path) as trail:
        for i in range(1, 6):
            trail.append(entry(i))
    yield path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    audit_command.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_appends_are_numbered_and_the_chain_verifies(tmp_path: Path) -> None:
    with AuditTrail(tmp_path / "a.sqlite") as trail:
        results = [trail.append(entry(i)) for i in range(1, 4)]
        dropped = trail.append(
            entry(4, outcome="dropped", reason="label-image", destination=None, delivered_at=None)
        )
        verdict = trail.verify()
        rows = trail.records()
    assert [r.seq for r in results] == [1, 2, 3]
    assert dropped.seq == 4
    assert verdict.ok and verdict.records == 4 and verdict.head_seq == 4
    assert verdict.head_hash == dropped.record_hash
    assert rows[0]["prev_hash"] == "0" * 64
    assert rows[1]["prev_hash"] == results[0].record_hash
    assert rows[3]["reason"] == "label-image" and rows[3]["delivered_at"] is None
    assert rows[0]["received_at"] == "2026-01-02T03:04:06.678901+00:00"


def test_sqlite_appends_write_the_rows_sqlalchemy_writes(tmp_path: Path) -> None:
    """SQLite stores take appends over a kept connection; the same entries
    appended through SQLAlchemy give the same rows, and the chain verifies."""
    stores = {}
    for way in ("kept-connection", "sqlalchemy"):
        with AuditTrail(tmp_path / f"{way}.sqlite") as trail:
            if way == "sqlalchemy":
                trail._sqlite = None
            for i in range(1, 4):
                trail.append(entry(i, reason=None if i % 2 else "x"))
            assert trail.verify().ok
            stores[way] = trail.records()
    assert stores["kept-connection"] == stores["sqlalchemy"]
    assert len(stores["sqlalchemy"]) == 3


def test_an_empty_trail_verifies(tmp_path: Path) -> None:
    with AuditTrail(tmp_path / "a.sqlite") as trail:
        verdict = trail.verify()
    assert verdict.ok and verdict.records == 0


def test_cli_verify_passes_on_an_intact_trail(
    trail_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("audit", "verify", "--db", str(trail_path)) == 0
    assert "5 records" in capsys.readouterr().out


def test_an_altered_field_is_detected_and_named(
    trail_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(trail_path) as db:
        db.execute("UPDATE audit_records SET outcome = 'dropped' WHERE seq = 3")
    with AuditTrail(trail_path, create=False) as trail:
        verdict = trail.verify()
    assert not verdict.ok
    assert verdict.broken_seq == 3
    assert verdict.problem == "content does not match its hash"
    assert run_cli("audit", "verify", "--db", str(trail_path)) == 1
    assert "record 3" in capsys.readouterr().err


def test_an_altered_hash_breaks_the_link_to_the_next_record(trail_path: Path) -> None:
    with sqlite3.connect(trail_path) as db:
        db.execute("UPDATE audit_records SET record_hash = ? WHERE seq = 2", ("f" * 64,))
    with AuditTrail(trail_path, create=False) as trail:
        verdict = trail.verify()
    assert not verdict.ok and verdict.broken_seq == 2


def test_a_deleted_record_is_detected(trail_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with sqlite3.connect(trail_path) as db:
        db.execute("DELETE FROM audit_records WHERE seq = 2")
    with AuditTrail(trail_path, create=False) as trail:
        verdict = trail.verify()
    assert not verdict.ok and verdict.broken_seq == 2
    assert verdict.problem is not None and "missing" in verdict.problem
    assert run_cli("audit", "verify", "--db", str(trail_path)) == 1
    assert "record 2" in capsys.readouterr().err


def test_records_cut_from_the_end_are_detected(trail_path: Path) -> None:
    with sqlite3.connect(trail_path) as db:
        db.execute("DELETE FROM audit_records WHERE seq >= 4")
    with AuditTrail(trail_path, create=False) as trail:
        verdict = trail.verify()
    assert not verdict.ok and verdict.broken_seq == 4


def test_a_record_added_behind_the_head_is_detected(trail_path: Path) -> None:
    with sqlite3.connect(trail_path) as db:
        db.execute(
            "INSERT INTO audit_records SELECT 6, received_at, calling_ae, input_sha256,"
            " new_sop_instance_uid, profile, profile_sha256, action_counts, outcome, reason,"
            " destination, delivered_at, record_hash, record_hash FROM audit_records WHERE seq = 5"
        )
    with AuditTrail(trail_path, create=False) as trail:
        verdict = trail.verify()
    assert not verdict.ok and verdict.broken_seq == 6


def test_concurrent_writers_keep_one_linear_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    with AuditTrail(path) as trail:
        seqs: list[int] = []
        lock = threading.Lock()

        def write(worker: int) -> None:
            for i in range(25):
                result = trail.append(entry(worker * 100 + i))
                with lock:
                    seqs.append(result.seq)

        threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        verdict = trail.verify()
    assert sorted(seqs) == list(range(1, 201))
    assert verdict.ok and verdict.records == 200


def test_writers_in_separate_processes_share_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    AuditTrail(path).close()
    script = (
        "import sys\n"
        "from tests.test_audit import entry\n"
        "from gateway.audit import AuditTrail\n"
        "with AuditTrail(sys.argv[1]) as t:\n"
        "    for i in range(30):\n"
        "        t.append(entry(int(sys.argv[2]) + i))\n"
    )
    root = Path(__file__).resolve().parent.parent
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(n * 1000)], cwd=root)
        for n in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with AuditTrail(path, create=False) as trail:
        verdict = trail.verify()
    assert verdict.ok and verdict.records == 90


def test_files_are_private_to_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "a.sqlite"
    with AuditTrail(path) as trail:
        trail.append(entry(1))
        created = sorted(p.name for p in tmp_path.iterdir())
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert "a.sqlite" in created and "a.sqlite-wal" in created
    assert set(modes.values()) == {0o600}, modes


def test_verify_does_not_create_a_missing_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing.sqlite"
    with pytest.raises(AuditError):
        AuditTrail(missing, create=False)
    assert run_cli("audit", "verify", "--db", str(missing)) == 2
    assert not missing.exists()
    assert "cannot open" in capsys.readouterr().err


def test_cli_show_prints_json_lines(trail_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("audit", "show", "--db", str(trail_path), "--after", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and '"seq": 4' in lines[0]


@pytest.mark.parametrize(
    "changes",
    [
        {"received_at": datetime(2026, 1, 1)},  # naive: ambiguous in an audit trail
        {"input_sha256": "DOE^JANE"},
        {"outcome": "maybe"},
        {"new_sop_instance_uid": "DOE^JANE"},
        {"reason": "Patient DOE^JANE"},
        {"action_counts": {"remove": -1}},
        {"destination": "DOE^JANE"},
    ],
)
def test_entries_with_malformed_fields_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        entry(1, **changes)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path, chunk_size=1) == expected


# --- PostgreSQL, on a private server started for the test -----------------------


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    as_user: list[str] = []
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres account to run the server")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser")
        as_user = [runuser, "-u", "postgres", "--"]
        owner = (account.pw_uid, account.pw_gid)
    base = Path(tempfile.mkdtemp(prefix="deid-audit-pg-"))
    if owner is not None:
        os.chown(base, *owner)
    data = base / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "gateway", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base}"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://gateway@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_replicas_write_one_chain_and_tampering_is_detected(postgres_url: str) -> None:
    replicas = [AuditTrail(postgres_url) for _ in range(3)]
    try:

        def write(n: int) -> None:
            for i in range(20):
                replicas[n].append(entry(n * 100 + i))
                time.sleep(0)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        verdict = replicas[0].verify()
        assert verdict.ok and verdict.records == 60

        engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
        with engine.begin() as conn:
            conn.execute(text("UPDATE audit_records SET calling_ae = 'OTHER' WHERE seq = 17"))
        engine.dispose()
        verdict = replicas[1].verify()
        assert not verdict.ok and verdict.broken_seq == 17
    finally:
        for replica in replicas:
            replica.close()

"""A bounded coverage-guided fuzz run (atheris) of ``check_file`` and the engine.

Skipped when atheris is not installed. The run starts from the data sets of
the committed malformed corpus and stops after a fixed number of inputs; any
input that makes ``tests/fuzz/atheris_target.py`` fail is reported with its
bytes, to be added to ``tests/fuzz/make_corpus.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.make_corpus import CORPUS, part10

pytest.importorskip("atheris")

RUNS = 3000
ROOT = Path(__file__).resolve().parent.parent


def test_atheris_finds_nothing_in_a_bounded_run(tmp_path: Path) -> None:
    seeds, artifacts = tmp_path / "seeds", tmp_path / "artifacts"
    seeds.mkdir()
    artifacts.mkdir()
    header = len(part10(b""))
    for case in sorted(CORPUS.glob("*.dcm")):
        (seeds / case.stem).write_bytes(case.read_bytes()[header:])
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "tests.fuzz.atheris_target", f"-runs={RUNS}",
         "-max_len=4096", "-timeout=10", "-max_total_time=80", "-rss_limit_mb=4096",
         "-seed=7", f"-artifact_prefix={artifacts}/", str(seeds)],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
    )
    findings = {p.name: p.read_bytes().hex() for p in artifacts.iterdir()}
    assert result.returncode == 0 and not findings, (findings, result.stderr[-3000:])
    done = re.search(r"Done (\d+) runs in (\d+) second", result.stderr)
    assert done is not None, result.stderr[-2000:]
    runs, seconds = int(done.group(1)), int(done.group(2))
    # -max_total_time may end the run first on a slow machine; it must still be substantial.
    assert runs >= RUNS // 2, runs
    print(f"atheris: {runs} inputs in {seconds} s, nothing found")

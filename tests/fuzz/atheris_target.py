"""A libFuzzer target (atheris): ``check_file`` and the engine on fuzzed data sets.

Each input is a data set's bytes behind a valid File Meta (as a sender's
C-STORE would arrive in the spool). An input fails when either function
raises, when the engine passes what ``check_file`` rejects, or when the engine
leaves an output for an instance it did not pass. libFuzzer ends its process,
so ``tests/test_fuzz_atheris.py`` runs this in a subprocess; by hand::

    python -m tests.fuzz.atheris_target -runs=100000 -max_len=4096 SEED_DIR

A failing input is saved as ``crash-<sha1>`` (see ``-artifact_prefix``): once
fixed, it joins the regression corpus as a case of ``make_corpus._cases``
(``part10(<its bytes>)``), and ``python -m tests.fuzz.make_corpus`` rewrites
``tests/fuzz/corpus/``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["gateway", "pydicom"]):
    from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
    from gateway.deid.stream import check_file

from tests.fuzz.make_corpus import part10

DEID = Deidentifier(load_profile("research"), SecretKey(b"k" * 32))
WORK = Path(tempfile.mkdtemp(prefix="atheris-"))


def test_one_input(data: bytes) -> None:
    src, out = WORK / "in.dcm", WORK / "out.dcm"
    out.unlink(missing_ok=True)
    src.write_bytes(part10(data))
    problem = check_file(src)
    report = DEID.deidentify_file(src, out)
    if problem is not None and report.outcome is Outcome.PASSED:
        raise AssertionError("the engine passed a data set check_file rejects")
    if report.outcome is not Outcome.PASSED and out.exists():
        raise AssertionError("an output was written for an instance not passed")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

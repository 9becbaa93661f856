"""``deid-gateway deidentify`` and ``deid-gateway explain`` run as a user runs them:
a separate process over a synthetic study folder, checked from the outside.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.synthetic import SyntheticStudy

REPO = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_SETUP, EXIT_QUARANTINED = 0, 2, 3
NOT_DICOM = b"Slide scanner export log\nno image here\n" * 8


@dataclass(frozen=True)
class Cli:
    returncode: int
    stdout: str
    stderr: str


def gateway(*args: str, cwd: Path = REPO) -> Cli:
    """Run ``python -m gateway ARGS`` with no key in the environment and no terminal."""
    env = {name: value for name, value in os.environ.items() if name != "DEID_GATEWAY_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL, timeout=120,
        check=False,
    )  # fmt: skip
    return Cli(result.returncode, result.stdout, result.stderr)


def gateway_concurrently(runs: list[list[str]]) -> list[Cli]:
    """Several independent runs, as many at once as there are processors."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(runs), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda args: gateway(*args), runs))


@dataclass(frozen=True)
class StudyRun:
    cli: Cli
    inputs: list[Path]
    junk: Path
    output: Path
    quarantine: Path
    report: dict[str, Any]

    def entry(self, path: Path) -> dict[str, Any]:
        (entry,) = [e for e in self.report["inputs"] if Path(e["input"]) == path]
        return entry

    def outputs(self) -> list[Path]:
        return sorted(p for p in self.output.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def study_run(
    synthetic_study: SyntheticStudy, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> StudyRun:
    """The research profile over the study folder plus one non-DICOM file."""
    work = tmp_path_factory.mktemp("cli")
    junk = work / "export.log"
    junk.write_bytes(NOT_DICOM)
    root = synthetic_study.sr.parent
    output, quarantine, report = work / "out", work / "quarantine", work / "report.json"
    cli = gateway(
        "deidentify", "--profile", "research", "--key-file", str(key_file), "--output", str(output),
        "--quarantine", str(quarantine), "--report", str(report), str(root), str(junk),
    )  # fmt: skip
    loaded = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}
    return StudyRun(cli, [*synthetic_study.all_files(), junk], junk, output, quarantine, loaded)


def _flavor(path: Path) -> str | None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    image_type = ds.get("ImageType")
    return str(image_type[2]) if image_type is not None and len(image_type) > 2 else None


# --------------------------------------------------------------------------
# deidentify over a study


def test_exit_status_3_when_something_is_quarantined_and_no_traceback(study_run: StudyRun) -> None:
    assert study_run.cli.returncode == EXIT_QUARANTINED, study_run.cli.stderr
    assert "Traceback" not in study_run.cli.stderr
    # One summary line: 17 inputs, of which 4 dropped, 10 passed, 3 quarantined.
    (summary,) = study_run.cli.stderr.strip().splitlines()
    assert summary.startswith("17 input(s):")
    for part in ("4 dropped", "10 passed", "3 quarantined"):
        assert part in summary


def test_report_lists_every_input_with_its_outcome_and_reason(
    study_run: StudyRun, synthetic_study: SyntheticStudy
) -> None:
    entries = study_run.report["inputs"]
    assert study_run.report["profile"] == "research"
    assert sorted(Path(e["input"]) for e in entries) == sorted(study_run.inputs)
    assert all({"outcome", "reason"} <= set(e) for e in entries)
    expected: dict[Path, tuple[str, str | None]] = {}
    for slide in synthetic_study.slides:
        for path in slide:
            expected[path] = {
                "label.dcm": ("dropped", "label-image"),
                "overview.dcm": ("dropped", "overview-image"),
            }.get(path.name, ("passed", None))
    expected[synthetic_study.sr] = ("passed", None)
    for capture in synthetic_study.secondary_captures:
        expected[capture] = {
            "capture_yes.dcm": ("quarantined", "burned-in-annotation"),
            "capture_absent.dcm": ("quarantined", "burned-in-annotation-unknown"),
            "capture_no.dcm": ("passed", None),
        }[capture.name]
    expected[study_run.junk] = ("quarantined", "unreadable")
    actual = {Path(e["input"]): (e["outcome"], e["reason"]) for e in entries}
    assert actual == expected
    # Passed entries name their output, which exists; the others name none.
    for entry in entries:
        if entry["outcome"] == "passed":
            assert Path(entry["output"]).is_file()
            assert Path(entry["output"]).name == f"{entry['new_sop_instance_uid']}.dcm"
        else:
            assert "output" not in entry


def test_only_passed_instances_are_written_never_label_or_overview(study_run: StudyRun) -> None:
    written = study_run.outputs()
    passed = [Path(e["output"]) for e in study_run.report["inputs"] if e["outcome"] == "passed"]
    assert written == sorted(passed)
    assert not (study_run.output / ".incoming").exists()
    flavors = [_flavor(path) for path in written]
    assert "LABEL" not in flavors and "OVERVIEW" not in flavors
    assert flavors.count("VOLUME") == 7


def test_quarantined_inputs_are_kept_owner_only_with_their_reason(study_run: StudyRun) -> None:
    assert stat.S_IMODE(study_run.quarantine.stat().st_mode) == 0o700
    quarantined = [e for e in study_run.report["inputs"] if e["outcome"] == "quarantined"]
    assert len(quarantined) == 3
    for path in study_run.quarantine.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    for entry in quarantined:
        copy = Path(entry["quarantined_copy"])
        assert copy.read_bytes() == Path(entry["input"]).read_bytes()
        reason = copy.with_suffix(".json")
        assert json.loads(reason.read_text(encoding="utf-8"))["reason"] == entry["reason"]
        for path in (copy, reason):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_dropped_instances_are_not_copied_to_quarantine(study_run: StudyRun) -> None:
    dropped = [e for e in study_run.report["inputs"] if e["outcome"] == "dropped"]
    assert len(dropped) == 4
    assert [e["input"] for e in dropped if "quarantined_copy" in e] == []
    assert len(list(study_run.quarantine.glob("*.dcm"))) == 3


def test_no_planted_value_in_any_output_byte_report_or_message(
    study_run: StudyRun, planted_tokens: list[str]
) -> None:
    blobs = {path.name: path.read_bytes() for path in study_run.outputs()}
    assert len(blobs) == 10
    blobs["report"] = json.dumps(study_run.report).encode()
    blobs["stdout+stderr"] = (study_run.cli.stdout + study_run.cli.stderr).encode()
    leaks = {name: [t for t in planted_tokens if t.encode() in data] for name, data in blobs.items()}
    assert {name: found for name, found in leaks.items() if found} == {}


def test_exit_status_0_when_everything_is_passed_or_dropped(
    synthetic_study: SyntheticStudy, key_file: Path, tmp_path: Path
) -> None:
    slide = synthetic_study.slides[1][0].parent
    capture = next(p for p in synthetic_study.secondary_captures if p.name == "capture_no.dcm")
    report = tmp_path / "report.json"
    cli = gateway(
        "deidentify", "--key-file", str(key_file), "--output", str(tmp_path / "out"),
        "--report", str(report), str(slide), str(capture),
    )  # fmt: skip
    assert cli.returncode == EXIT_OK, cli.stderr
    outcomes = sorted(e["outcome"] for e in json.loads(report.read_text(encoding="utf-8"))["inputs"])
    assert outcomes == ["dropped", "dropped", "passed", "passed", "passed", "passed"]
    assert len([p for p in (tmp_path / "out").rglob("*.dcm")]) == 4


# --------------------------------------------------------------------------
# Setup errors


SETUP_CASES = ["missing-profile", "bad-profile", "no-key", "missing-key-file"]


@pytest.fixture(scope="module")
def setup_failures(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Cli, Path]]:
    """Each bad profile or key case, run concurrently; with the output folder it was given."""
    work = tmp_path_factory.mktemp("setup")
    junk = work / "input.bin"
    junk.write_bytes(NOT_DICOM)
    bad_profile = work / "bad.yaml"
    bad_profile.write_text(
        "name: bad\nextends: research\nrules:\n  - attribute: NoSuchKeyword\n    action: X\n"
    )
    options = {
        "missing-profile": ["--profile", str(work / "nowhere.yaml"), "--key-file", str(key_file)],
        "bad-profile": ["--profile", str(bad_profile), "--key-file", str(key_file)],
        "no-key": ["--profile", "research"],
        "missing-key-file": ["--profile", "research", "--key-file", str(work / "nowhere.key")],
    }
    runs = [["deidentify", *options[case], "--output", str(work / case), str(junk)] for case in SETUP_CASES]
    return {
        case: (cli, work / case) for case, cli in zip(SETUP_CASES, gateway_concurrently(runs), strict=True)
    }


@pytest.mark.parametrize("case", SETUP_CASES)
def test_bad_profile_or_key_exits_2_with_one_line(
    case: str, setup_failures: dict[str, tuple[Cli, Path]]
) -> None:
    cli, output = setup_failures[case]
    assert cli.returncode == EXIT_SETUP, cli.stderr
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deid-gateway deidentify: "), cli.stderr
    assert "Traceback" not in cli.stderr
    assert not output.exists()
    if case == "bad-profile":
        # File and line of the fault.
        assert re.search(r"bad\.yaml:\d+", lines[0]), lines[0]


def test_input_that_cannot_be_opened_is_reported_without_traceback(key_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "vanished.dcm"
    report = tmp_path / "report.json"
    cli = gateway(
        "deidentify", "--key-file", str(key_file), "--output", str(tmp_path / "out"),
        "--quarantine", str(tmp_path / "quarantine"), "--report", str(report), str(missing),
    )  # fmt: skip
    assert "Traceback" not in cli.stderr
    assert cli.returncode == EXIT_QUARANTINED
    (entry,) = json.loads(report.read_text(encoding="utf-8"))["inputs"]
    assert (entry["outcome"], entry["reason"]) == ("quarantined", "unreadable")


# --------------------------------------------------------------------------
# explain

EXPLAIN_LINE = re.compile(
    r"^(?P<path>\S+)\s+(?P<tag>\([0-9A-F]{4},[0-9A-F]{4}\))\s+(?P<vr>[A-Z]{2})\s+"
    r"(?P<action>\S+)\s+(?P<rule>\S.*)$"
)


EXPLAINED = ["slide-level", "sr"]


@pytest.fixture(scope="module")
def explained(synthetic_study: SyntheticStudy) -> dict[str, tuple[Cli, Path]]:
    paths = [synthetic_study.slides[0][0], synthetic_study.sr]
    runs = gateway_concurrently([["explain", "--profile", "research", str(path)] for path in paths])
    return {name: (cli, path) for name, cli, path in zip(EXPLAINED, runs, paths, strict=True)}


@pytest.mark.parametrize("which", EXPLAINED)
def test_explain_prints_tag_keyword_action_and_rule_and_no_value(
    which: str, explained: dict[str, tuple[Cli, Path]], planted_tokens: list[str]
) -> None:
    cli, path = explained[which]
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert lines[0].startswith("profile research (sha256:")
    parsed = [EXPLAIN_LINE.match(line) for line in lines[1:]]
    assert all(parsed), [line for line, m in zip(lines[1:], parsed, strict=True) if not m][:3]
    rows = {m["path"]: m for m in parsed if m}
    # Every top-level element of the instance is listed under its keyword and tag.
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for elem in ds:
        if elem.tag.is_private_creator:
            continue  # a private creator goes with its block, explained element by element
        label = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        assert label in rows, label
        assert rows[label]["tag"] == f"({elem.tag.group:04X},{elem.tag.element:04X})"
        assert rows[label]["vr"] == elem.VR
    assert rows["PatientName"]["action"] == "pseudonym"
    assert rows["StudyDate"]["action"] == "C" and "Modified Dates" in rows["StudyDate"]["rule"]
    assert rows["InstitutionName"]["action"] == "X"
    assert "Table E.1-1" in rows["AccessionNumber"]["rule"]
    # Nested elements are explained too.
    assert any("." in p and "[" in p for p in rows)
    output = cli.stdout + cli.stderr
    assert [t for t in planted_tokens if t in output] == []

"""Defence in depth: the output is searched for the input's identifying values
before it passes; the evidence (mappings) and the batch verifier."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.deid.profile import Profile
from gateway.synthetic import PlantedPHI
from tests.test_engine import instance, sr_document

KEY = SecretKey(b"verify-test-key-0123456789abcdefghij")


def _profile(tmp_path: Path, body: str) -> Profile:
    path = tmp_path / "gap.yaml"
    path.write_text("extends: research\n" + body, encoding="utf-8")
    return load_profile(path)


def _gap(tmp_path: Path, *keywords: str) -> Profile:
    """research with the rules for ``keywords`` taken out (the attribute kept)."""
    rules = "".join(
        f"  - attribute: {k}\n    action: K\n    why: a deliberate gap for the test\n" for k in keywords
    )
    return _profile(tmp_path, "rules:\n" + rules)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientName", "Quintavalle^Rosaria"),
        ("ContainerIdentifier", "SLIDE-BARCODE-991"),
        ("AccessionNumber", "ACC-20240314-77"),
        ("PatientBirthDate", "19580402"),
        ("StudyInstanceUID", "1.3.6.1.4.1.99999.1"),
        ("OperatorsName", "Vandermeer^Josefina"),
    ],
)
def test_a_missing_rule_quarantines_instead_of_leaking(tmp_path: Path, keyword: str, value: str) -> None:
    ds = instance()
    setattr(ds, keyword, value)
    profile = _gap(tmp_path, keyword)
    report = Deidentifier(profile, KEY).deidentify(ds)
    assert (report.outcome, report.reason) == (Outcome.QUARANTINED, "phi-found-in-output")
    assert any(f.startswith(keyword) for f in report.findings), report.findings
    assert value not in report.detail and all(value not in f for f in report.findings)


def test_file_level_gap_writes_nothing(tmp_path: Path) -> None:
    ds = instance()
    del ds.PixelData
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds.save_as(src, enforce_file_format=True)
    report = Deidentifier(_gap(tmp_path, "PatientName"), KEY).deidentify_file(src, dst)
    assert report.outcome is Outcome.QUARANTINED
    assert not dst.exists()


def _hide(ds: Dataset, where: str, value: str) -> None:
    if where == "private sequence":
        ds.add_new(0x00090010, "LO", "ACME 1.0")
        inner = Dataset()
        inner.add_new(0x00090010, "LO", "ACME 1.0")
        inner.add_new(0x00091001, "LO", f"note on {value}")
        ds.add_new(0x00091001, "SQ", Sequence([inner]))
    elif where == "UN element":
        ds.add_new(0x00090010, "LO", "ACME 1.0")
        ds.add_new(0x00091002, "UN", f"\x01\x02{value}\x00".encode("latin-1"))


@pytest.mark.parametrize("where", ["private sequence", "UN element"])
def test_hidden_values_in_kept_private_data_are_caught(tmp_path: Path, where: str) -> None:
    ds = instance()
    _hide(ds, where, "QUINTAVALLE")
    profile = _profile(tmp_path, "private:\n  keep_creators: [ACME 1.0]\n")
    report = Deidentifier(profile, KEY).deidentify(ds)
    assert (report.outcome, report.reason) == (Outcome.QUARANTINED, "phi-found-in-output")
    assert report.findings and report.findings[0].startswith("(0009,100")


def test_sr_text_with_a_gap_is_caught(tmp_path: Path) -> None:
    profile = _gap(tmp_path, "TextValue")
    report = Deidentifier(profile, KEY).deidentify(sr_document())
    assert report.outcome is Outcome.QUARANTINED
    assert any(f.startswith("ContentSequence[0].TextValue") for f in report.findings)


def test_specimen_preparation_item_with_a_gap_is_caught(tmp_path: Path) -> None:
    ds = instance()
    step = Dataset()
    step.ValueType = "TEXT"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    step.ConceptNameCodeSequence = [concept]
    step.TextValue = "grossed by Vandermeer for Rosaria Quintavalle"
    preparation = Dataset()
    preparation.SpecimenPreparationStepContentItemSequence = [step]
    description = Dataset()
    description.SpecimenIdentifier = "SPEC-1"
    description.SpecimenUID = "1.3.6.1.4.1.99999.88"
    description.SpecimenPreparationSequence = [preparation]
    ds.SpecimenDescriptionSequence = [description]
    clean = Deidentifier(load_profile("research"), KEY).deidentify(copy.deepcopy(ds))
    assert clean.outcome is Outcome.PASSED  # the cleaner removes the name itself
    report = Deidentifier(_gap(tmp_path, "TextValue"), KEY).deidentify(ds)
    assert report.outcome is Outcome.QUARANTINED
    assert any("SpecimenPreparationStepContentItemSequence[0].TextValue" in f for f in report.findings)


def test_deliberately_kept_values_are_not_flagged(tmp_path: Path) -> None:
    ds = instance()
    ds.InstitutionName = "Ospedale Generale"
    profile = _profile(tmp_path, "options: [retain_institution_identity]\n")
    report = Deidentifier(profile, KEY).deidentify(ds)
    assert report.outcome is Outcome.PASSED
    assert ds.InstitutionName == "Ospedale Generale"


def _study(tmp_path: Path) -> Path:
    from gateway.synthetic import write_study

    folder = tmp_path / "in"
    write_study(folder, PlantedPHI.create(seed=5), slides=1)
    return folder


def test_mapping_dir_and_batch_verify(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    folder = _study(tmp_path)
    out, mapping = tmp_path / "out", tmp_path / "evidence"
    cli = [sys.executable, "-m", "gateway"]
    subprocess.run(
        [*cli, "deidentify", "--key-file", str(key), "--output", str(out),
         "--mapping-dir", str(mapping), str(folder)],
        check=False, capture_output=True,
    )  # fmt: skip
    assert mapping.stat().st_mode & 0o777 == 0o700
    for name in ("uid_mapping.csv", "patient_id_mapping.csv"):
        path = mapping / name
        assert path.stat().st_mode & 0o777 == 0o600
        rows = list(csv.reader(path.open()))
        assert rows[0] == ["id_old", "id_new"] and len(rows) > 1
    uid_rows = dict(csv.reader((mapping / "uid_mapping.csv").open()))
    assert all(new.startswith("2.25.") for old, new in uid_rows.items() if old != "id_old")
    clean = subprocess.run(
        [*cli, "verify", "--input-dir", str(folder), "--output-dir", str(out)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert clean.returncode == 0, clean.stdout
    assert "outputs with hits:  0" in clean.stdout
    assert "unaddressed attributes" in clean.stdout and "(0009,1001)" in clean.stdout
    # Tamper with one output: an original UID and the patient's name, in a private tag.
    victim = next(out.rglob("*.dcm"))
    ds = pydicom.dcmread(victim)
    original_uid = next(old for old in uid_rows if old != "id_old")
    ds.add_new(0x00110010, "LO", "X")
    ds.add_new(0x00111001, "LO", f"ref {original_uid}")
    ds.save_as(victim)
    dirty = subprocess.run(
        [*cli, "verify", "--input-dir", str(folder), "--output-dir", str(out)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert dirty.returncode == 1
    assert "outputs with hits:  1" in dirty.stdout and "(0011,1001) (uid)" in dirty.stdout
    assert original_uid not in dirty.stdout


def test_serve_writes_mappings_for_what_it_delivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from gateway.config import DEFAULT_CONFIG_YAML, parse_config
    from gateway.node import Node
    from gateway.synthetic import write_slide
    from tests.test_node_edges import send, wait_idle

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(DEFAULT_CONFIG_YAML)
    data["listen"]["port"] = 0
    data["metrics"]["port"] = 0
    data["mapping_dir"] = "evidence"
    node = Node(parse_config(data, tmp_path, generate_key=True))
    node.start()
    try:
        assert node.address is not None
        phi = PlantedPHI.create(seed=21)
        files = write_slide(tmp_path / "slide", phi, levels=1, label=False, overview=False)
        for path in files:
            assert send(node.address[1], path) == (True, 0)
        wait_idle(node)
    finally:
        node.stop()
    archived = list((tmp_path / "gateway-data" / "archive").rglob("*.dcm"))
    assert len(archived) == len(files)
    evidence = tmp_path / "evidence"
    assert evidence.stat().st_mode & 0o777 == 0o700
    uid_rows = dict(list(csv.reader((evidence / "uid_mapping.csv").open()))[1:])
    patient_rows = dict(list(csv.reader((evidence / "patient_id_mapping.csv").open()))[1:])
    assert patient_rows == {phi.patient_id: pydicom.dcmread(archived[0]).PatientID}
    for path in archived:
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID in uid_rows.values()

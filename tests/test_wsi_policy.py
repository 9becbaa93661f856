"""Whole-slide image policies set in the profile, and overview redaction
through the engine, checked by OCR on the output."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.deid.profile import Profile, ProfileError
from gateway.ocr import read_words
from gateway.synthetic import PlantedPHI, write_slide
from tests.test_engine import instance

KEY = SecretKey(b"wsi-policy-test-key-0123456789abcdefgh")


def _profile(tmp_path: Path, settings: str) -> Profile:
    path = tmp_path / "p.yaml"
    path.write_text("extends: research\nsettings:\n" + settings, encoding="utf-8")
    return load_profile(path)


def test_thumbnail_and_sop_class_policies(tmp_path: Path) -> None:
    profile = _profile(tmp_path, "  thumbnail: drop\n  drop_sop_classes: [ComprehensiveSRStorage]\n")
    engine = Deidentifier(profile, KEY)
    thumb = engine.deidentify(instance("THUMBNAIL"))
    assert (thumb.outcome, thumb.reason) == (Outcome.DROPPED, "thumbnail-image")
    report = engine.deidentify(instance("DERIVED", "1.2.840.10008.5.1.4.1.1.88.33"))
    assert (report.outcome, report.reason) == (Outcome.DROPPED, "sop-class-dropped")
    assert engine.deidentify(instance("VOLUME")).outcome is Outcome.PASSED
    with pytest.raises(ProfileError, match="not a SOP Class"):
        _profile(tmp_path, "  drop_sop_classes: [NoSuchStorage]\n")


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], PlantedPHI]:
    phi = PlantedPHI.create(seed=11)
    files = write_slide(tmp_path_factory.mktemp("slide"), phi, levels=2, width=1024, height=768)
    return files, phi


def _overview(files: list[Path]) -> Path:
    for path in files:
        if "OVERVIEW" in pydicom.dcmread(path, stop_before_pixels=True).ImageType:
            return path
    raise AssertionError("the synthetic slide has no overview")


def _ocr_text(path: Path) -> str:
    from PIL import Image

    ds = pydicom.dcmread(path)
    words = read_words(Image.fromarray(ds.pixel_array).convert("L"))
    return " ".join(w.text for w in words).upper()


@pytest.mark.parametrize("mode", ["redact", "replace"])
def test_overview_redaction_end_to_end(
    tmp_path: Path, slide: tuple[list[Path], PlantedPHI], mode: str
) -> None:
    files, phi = slide
    src = _overview(files)
    before = _ocr_text(src)
    planted = [t for t in (phi.container_id, phi.patient_id) if t.upper() in before]
    assert planted, "OCR must read the label before redaction, or the check below proves nothing"
    engine = Deidentifier(_profile(tmp_path, f"  overview: {mode}\n"), KEY)
    dst = tmp_path / "overview.dcm"
    report = engine.deidentify_file(src, dst)
    assert report.outcome is Outcome.PASSED, report.public()
    out = pydicom.dcmread(dst)
    assert out.BurnedInAnnotation == "NO"
    assert out.file_meta.TransferSyntaxUID == pydicom.dcmread(src).file_meta.TransferSyntaxUID
    after = _ocr_text(dst)
    assert not [t for t in planted if t.upper() in after]
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert "113101" in codes  # Clean Pixel Data Option
    if mode == "replace":
        # The research identifiers are painted over the label (OCR may misread a character).
        assert "SLIDE-" in after and "SUBJ-" in after

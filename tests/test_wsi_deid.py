"""Whole-slide de-identification end to end: the research profile over a synthetic
study, checked for pyramid integrity, specimen handling, references, dates,
wsidicom readability, dciodvfy conformance and planted values.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from wsidicom import WsiDicom

from gateway.deid import Deidentifier, DeidReport, Outcome, SecretKey, load_profile
from gateway.synthetic import SyntheticStudy

SLIDE_WIDE = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PyramidUID",
    "ContainerIdentifier",
)
UID_PATTERN = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))+$")


@dataclass(frozen=True)
class Result:
    src: Path
    report: DeidReport
    dst: Path | None


@dataclass(frozen=True)
class Run:
    root_in: Path
    root_out: Path
    results: dict[Path, Result]  # by input path

    def out(self, src: Path) -> Path:
        dst = self.results[src].dst
        assert dst is not None, f"{src.name} was not passed: {self.results[src].report.public()}"
        return dst

    def passed(self) -> list[Result]:
        return [r for r in self.results.values() if r.dst is not None]


@pytest.fixture(scope="module")
def run(synthetic_study: SyntheticStudy, key: SecretKey, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The research profile over the whole study, outputs laid out like the inputs."""
    deid = Deidentifier(load_profile("research"), key)
    root_in = synthetic_study.sr.parent
    root_out = tmp_path_factory.mktemp("wsi-out")
    results: dict[Path, Result] = {}
    for src in synthetic_study.all_files():
        dst = root_out / src.relative_to(root_in)
        dst.parent.mkdir(parents=True, exist_ok=True)
        report = deid.deidentify_file(src, dst)
        results[src] = Result(src, report, dst if dst.exists() else None)
        assert dst.exists() == (report.outcome is Outcome.PASSED)
    return Run(root_in, root_out, results)


def header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def image_flavor(ds: Dataset) -> str:
    return str(ds.ImageType[2])


def walk(ds: Dataset) -> Iterator[Dataset]:
    """``ds`` and every item of every sequence below it."""
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from walk(item)


def slide_outputs(run: Run, slide: list[Path]) -> list[Dataset]:
    return [header(run.out(p)) for p in slide if run.results[p].dst is not None]


def by_name(slide: list[Path], name: str) -> Path:
    return next(p for p in slide if p.name == name)


# --------------------------------------------------------------------------
# Image types


def test_label_and_overview_are_dropped_and_never_written(run: Run, synthetic_study: SyntheticStudy) -> None:
    for slide in synthetic_study.slides:
        for name in ("label.dcm", "overview.dcm"):
            result = run.results[by_name(slide, name)]
            assert result.report.outcome is Outcome.DROPPED
            assert result.dst is None
    written = [header(r.dst) for r in run.passed() if r.dst is not None]
    flavors = Counter(image_flavor(ds) for ds in written if "ImageType" in ds and len(ds.ImageType) > 2)
    assert flavors["LABEL"] == flavors["OVERVIEW"] == 0
    assert flavors["VOLUME"] == 7 and flavors["THUMBNAIL"] == 1
    on_disk = sorted(p for p in run.root_out.rglob("*") if p.is_file())
    assert on_disk == sorted(r.dst for r in run.passed() if r.dst is not None)


# --------------------------------------------------------------------------
# Pyramid integrity


def test_every_instance_of_a_slide_shares_its_slide_wide_identifiers(
    run: Run, synthetic_study: SyntheticStudy
) -> None:
    for slide in synthetic_study.slides:
        originals = {kw: {str(header(p).get(kw)) for p in slide} for kw in SLIDE_WIDE}
        outputs = slide_outputs(run, slide)
        assert len(outputs) >= 3
        for keyword in SLIDE_WIDE:
            values = {str(ds.get(keyword, "")) for ds in outputs}
            assert len(values) == 1, (keyword, values)
            (value,) = values
            assert value.strip(), keyword
            assert value not in originals[keyword], keyword


def test_two_slides_get_different_series_pyramid_and_container(
    run: Run, synthetic_study: SyntheticStudy
) -> None:
    first, second = (slide_outputs(run, slide)[0] for slide in synthetic_study.slides)
    assert first.StudyInstanceUID == second.StudyInstanceUID
    for keyword in ("SeriesInstanceUID", "PyramidUID", "ContainerIdentifier", "FrameOfReferenceUID"):
        assert first.get(keyword) != second.get(keyword), keyword


def test_new_uids_are_valid_and_not_the_originals(run: Run) -> None:
    for result in run.passed():
        assert result.dst is not None
        before, after = header(result.src), header(result.dst)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            new = str(after[keyword].value)
            assert new != str(before[keyword].value)
            assert len(new) <= 64 and UID_PATTERN.match(new), new
        assert after.SOPClassUID == before.SOPClassUID
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID


def test_concatenation_parts_stay_one_concatenation(run: Run, synthetic_study: SyntheticStudy) -> None:
    slide = synthetic_study.slides[0]
    parts = [by_name(slide, "level1_part1.dcm"), by_name(slide, "level1_part2.dcm")]
    before = [header(p) for p in parts]
    after = [header(run.out(p)) for p in parts]
    for keyword in ("ConcatenationUID", "SOPInstanceUIDOfConcatenationSource"):
        new = {str(ds[keyword].value) for ds in after}
        old = {str(ds[keyword].value) for ds in before}
        assert len(new) == 1 and len(old) == 1, keyword
        assert new != old, keyword
        assert UID_PATTERN.match(next(iter(new)))
    # The source UID is remapped by the same keyed function as every other UID.
    source = str(before[0].SOPInstanceUIDOfConcatenationSource)
    for part in parts:
        assert run.results[part].report.uid_map[source] == after[0].SOPInstanceUIDOfConcatenationSource
    # The source UID is remapped like any other: not onto a part's own new UID.
    assert after[0].SOPInstanceUIDOfConcatenationSource not in {ds.SOPInstanceUID for ds in after}
    for keyword in (
        "ConcatenationFrameOffsetNumber",
        "InConcatenationNumber",
        "InConcatenationTotalNumber",
        "NumberOfFrames",
        "InstanceNumber",
    ):
        assert [ds.get(keyword) for ds in after] == [ds.get(keyword) for ds in before], keyword
    assert after[0].SOPInstanceUID != after[1].SOPInstanceUID


def _positions(ds: Dataset) -> list[tuple[object, ...]]:
    rows = []
    for frame in ds.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSlideSequence[0]
        rows.append(
            (
                position.ColumnPositionInTotalImagePixelMatrix,
                position.RowPositionInTotalImagePixelMatrix,
                str(position.XOffsetInSlideCoordinateSystem),
                str(position.YOffsetInSlideCoordinateSystem),
                str(position.ZOffsetInSlideCoordinateSystem),
                tuple(frame.FrameContentSequence[0].DimensionIndexValues),
            )
        )
    return rows


def test_tiled_sparse_per_frame_positions_are_identical(run: Run, synthetic_study: SyntheticStudy) -> None:
    src = by_name(synthetic_study.slides[0], "level0.dcm")
    before, after = header(src), header(run.out(src))
    assert before.DimensionOrganizationType == "TILED_SPARSE"
    assert after.DimensionOrganizationType == "TILED_SPARSE"
    assert len(_positions(before)) == int(before.NumberOfFrames) > 0
    assert _positions(after) == _positions(before)
    # The dimension organisation still ties the index to the per-frame positions.
    organization = after.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert {item.DimensionOrganizationUID for item in after.DimensionIndexSequence} == {organization}
    assert organization != before.DimensionOrganizationSequence[0].DimensionOrganizationUID


def test_optical_paths_icc_profiles_origin_and_imaged_volume_are_kept(run: Run) -> None:
    for result in run.passed():
        before = header(result.src)
        if before.SOPClassUID != "1.2.840.10008.5.1.4.1.1.77.1.6":
            continue
        assert result.dst is not None
        after = header(result.dst)
        old_paths, new_paths = before.OpticalPathSequence, after.OpticalPathSequence
        assert len(new_paths) == len(old_paths) == int(after.NumberOfOpticalPaths)
        for old, new in zip(old_paths, new_paths, strict=True):
            assert new.ICCProfile == old.ICCProfile and len(new.ICCProfile) > 100
            assert new.OpticalPathIdentifier == old.OpticalPathIdentifier
            assert new.IlluminationTypeCodeSequence == old.IlluminationTypeCodeSequence
            assert new.get("ColorSpace") == old.get("ColorSpace")
        origin_before = before.TotalPixelMatrixOriginSequence[0]
        origin_after = after.TotalPixelMatrixOriginSequence[0]
        for keyword in ("XOffsetInSlideCoordinateSystem", "YOffsetInSlideCoordinateSystem"):
            assert origin_after[keyword].value == origin_before[keyword].value
        for keyword in (
            "ImagedVolumeWidth",
            "ImagedVolumeHeight",
            "ImagedVolumeDepth",
            "TotalPixelMatrixColumns",
            "TotalPixelMatrixRows",
            "ImageOrientationSlide",
            "Rows",
            "Columns",
            "PhotometricInterpretation",
        ):
            assert after.get(keyword) == before.get(keyword), keyword
        shared_before = before.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        shared_after = after.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert shared_after.PixelSpacing == shared_before.PixelSpacing


# --------------------------------------------------------------------------
# Specimen module


def _codes(ds: Dataset) -> Counter[tuple[str, str, str]]:
    """(concept name, code value, scheme) of every CODE content item of the preparation steps."""
    found: Counter[tuple[str, str, str]] = Counter()
    for description in ds.SpecimenDescriptionSequence:
        for step in description.SpecimenPreparationSequence:
            for item in step.SpecimenPreparationStepContentItemSequence:
                if item.ValueType == "CODE":
                    code = item.ConceptCodeSequence[0]
                    name = item.ConceptNameCodeSequence[0].CodeValue
                    found[(name, code.CodeValue, code.CodingSchemeDesignator)] += 1
    return found


def test_staining_and_other_preparation_codes_survive(run: Run, synthetic_study: SyntheticStudy) -> None:
    for slide in synthetic_study.slides:
        for src in slide:
            if run.results[src].dst is None:
                continue
            before, after = _codes(header(src)), _codes(header(run.out(src)))
            assert after == before
            values = {value for _, value, _ in after}
            # Haematoxylin, water soluble eosin, formalin, paraffin wax.
            assert {"12710003", "36879007", "431510009", "311731000"} <= values
            assert all(scheme in ("SCT", "DCM") for _, _, scheme in after)


def _text_items(step: Dataset, concept: str) -> list[str]:
    return [
        str(item.TextValue)
        for item in step.SpecimenPreparationStepContentItemSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == concept
    ]


SPECIMEN_IDENTIFIER = "121041"
PARENT_SPECIMEN_IDENTIFIER = "111705"


def test_specimen_uid_and_identifier_are_pseudonymised_consistently(
    run: Run, synthetic_study: SyntheticStudy
) -> None:
    pairs = []
    for slide in synthetic_study.slides:
        original = header(slide[0]).SpecimenDescriptionSequence[0]
        outputs = slide_outputs(run, slide)
        seen = {
            (
                str(ds.ContainerIdentifier),
                str(ds.SpecimenDescriptionSequence[0].SpecimenIdentifier),
                str(ds.SpecimenDescriptionSequence[0].SpecimenUID),
            )
            for ds in outputs
        }
        assert len(seen) == 1, seen
        ((container, specimen_id, specimen_uid),) = seen
        assert specimen_id.strip() and specimen_id != original.SpecimenIdentifier
        assert specimen_uid != original.SpecimenUID and UID_PATTERN.match(specimen_uid)
        # The steps on the slide's own specimen name it by the same pseudonym.
        own_steps = [
            _text_items(step, SPECIMEN_IDENTIFIER)
            for step in outputs[0].SpecimenDescriptionSequence[0].SpecimenPreparationSequence
        ]
        assert own_steps[-1] == [specimen_id]
        pairs.append((container, specimen_id, specimen_uid))
    assert len({p[0] for p in pairs}) == len({p[1] for p in pairs}) == len({p[2] for p in pairs}) == 2


def test_parent_specimen_identifiers_use_the_parents_pseudonym(
    run: Run, synthetic_study: SyntheticStudy
) -> None:
    src = synthetic_study.slides[0][0]
    before = header(src).SpecimenDescriptionSequence[0].SpecimenPreparationSequence
    after = header(run.out(src)).SpecimenDescriptionSequence[0].SpecimenPreparationSequence
    pseudonym_of: dict[str, str] = {}
    for old, new in zip(before, after, strict=True):
        for original, pseudonym in zip(
            _text_items(old, SPECIMEN_IDENTIFIER), _text_items(new, SPECIMEN_IDENTIFIER), strict=True
        ):
            assert pseudonym_of.setdefault(original, pseudonym) == pseudonym
    checked = 0
    for old, new in zip(before, after, strict=True):
        for original, pseudonym in zip(
            _text_items(old, PARENT_SPECIMEN_IDENTIFIER),
            _text_items(new, PARENT_SPECIMEN_IDENTIFIER),
            strict=True,
        ):
            assert pseudonym == pseudonym_of[original]
            checked += 1
    assert checked == 2


# --------------------------------------------------------------------------
# References and dates


def test_sr_references_resolve_to_output_instances(run: Run, synthetic_study: SyntheticStudy) -> None:
    sr = header(run.out(synthetic_study.sr))
    instances = {}
    for result in run.passed():
        assert result.dst is not None
        ds = header(result.dst)
        instances[str(ds.SOPInstanceUID)] = ds
    referenced = [
        str(item.ReferencedSOPInstanceUID) for item in walk(sr) if "ReferencedSOPInstanceUID" in item
    ]
    assert len(referenced) == 2  # the evidence sequence and the IMAGE content item
    for uid in referenced:
        assert uid in instances, uid
    target = instances[referenced[0]]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == target.StudyInstanceUID == sr.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == target.SeriesInstanceUID
    uidrefs = [str(item.UID) for item in walk(sr) if item.get("ValueType") == "UIDREF"]
    assert uidrefs == [str(target.StudyInstanceUID)]
    # The SR points at the base level of the first slide.
    assert target.SOPInstanceUID == header(run.out(synthetic_study.slides[0][0])).SOPInstanceUID


def _date(value: str) -> dt.date:
    return dt.datetime.strptime(str(value)[:8], "%Y%m%d").date()


def _datetime(value: str) -> dt.datetime:
    return dt.datetime.strptime(str(value)[:14], "%Y%m%d%H%M%S")


def _processing_datetimes(ds: Dataset) -> list[dt.datetime]:
    return [
        _datetime(item.DateTime)
        for step in ds.SpecimenDescriptionSequence[0].SpecimenPreparationSequence
        for item in step.SpecimenPreparationStepContentItemSequence
        if item.ValueType == "DATETIME"
    ]


def test_dates_are_shifted_and_intervals_between_them_preserved(
    run: Run, synthetic_study: SyntheticStudy
) -> None:
    shifts = set()
    for result in run.passed():
        assert result.dst is not None
        before, after = header(result.src), header(result.dst)
        shift = _date(after.StudyDate) - _date(before.StudyDate)
        assert shift.days != 0
        shifts.add(shift)
        for keyword in ("SeriesDate", "ContentDate", "InstanceCreationDate"):
            if keyword in before:
                assert _date(after[keyword].value) - _date(after.StudyDate) == _date(
                    before[keyword].value
                ) - _date(before.StudyDate), keyword
        if "AcquisitionDateTime" in before:
            acquired_before, acquired_after = (
                _datetime(before.AcquisitionDateTime),
                _datetime(after.AcquisitionDateTime),
            )
            assert acquired_after - acquired_before == shift
            steps_before = [acquired_before - t for t in _processing_datetimes(before)]
            steps_after = [acquired_after - t for t in _processing_datetimes(after)]
            assert steps_after == steps_before and len(steps_before) == 2
    # One offset per patient.
    assert len(shifts) == 1
    # Inside the SR: the DATE content item (a birth date) keeps its distance to the study date.
    sr_before, sr_after = header(synthetic_study.sr), header(run.out(synthetic_study.sr))

    def content_date(ds: Dataset) -> dt.date:
        (value,) = [item.Date for item in walk(ds) if item.get("ValueType") == "DATE"]
        return _date(value)

    assert _date(sr_after.StudyDate) - content_date(sr_after) == _date(sr_before.StudyDate) - content_date(
        sr_before
    )
    assert content_date(sr_after) != content_date(sr_before)


# --------------------------------------------------------------------------
# Readers and validators


def _levels(wsi: WsiDicom) -> list[tuple[object, ...]]:
    return [(level.level, level.size, level.tile_size, level.mpp, level.tiled_size) for level in wsi.levels]


@pytest.mark.parametrize("slide_index", [0, 1])
def test_output_slide_opens_in_wsidicom_with_the_same_levels_and_tile_bytes(
    run: Run, synthetic_study: SyntheticStudy, tmp_path: Path, slide_index: int
) -> None:
    slide = synthetic_study.slides[slide_index]
    # Only the pyramid levels, so both sides are read alike.
    volume_in = tmp_path / "in"
    volume_in.mkdir()
    for src in slide:
        if image_flavor(header(src)) == "VOLUME":
            shutil.copy(src, volume_in / src.name)
    with WsiDicom.open(volume_in) as original, WsiDicom.open(run.out(slide[0]).parent) as copy:
        assert _levels(copy) == _levels(original)
        assert len(original.levels) == 3
        tiles = 0
        for level in original.levels:
            width, height = level.tiled_size.width, level.tiled_size.height
            for y in range(height):
                for x in range(width):
                    assert copy.read_encoded_tile(level.level, (x, y)) == original.read_encoded_tile(
                        level.level, (x, y)
                    ), (level.level, x, y)
                    tiles += 1
        assert tiles == 48 + 12 + 4


def _dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )  # fmt: skip
    lines = (result.stdout + result.stderr).splitlines()
    return {line.strip() for line in lines if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")
def test_dciodvfy_finds_no_error_the_input_did_not_have(run: Run) -> None:
    pairs = [(r.src, r.dst) for r in run.passed() if r.dst is not None]
    with ThreadPoolExecutor(max_workers=8) as pool:
        before = list(pool.map(_dciodvfy_errors, [src for src, _ in pairs]))
        after = list(pool.map(_dciodvfy_errors, [dst for _, dst in pairs]))
    new = {src.name: sorted(a - b) for (src, _), b, a in zip(pairs, before, after, strict=True) if a - b}
    assert new == {}


def test_no_planted_value_in_any_output_byte(run: Run, planted_tokens: list[str]) -> None:
    assert len(planted_tokens) > 50
    leaks = {}
    for result in run.passed():
        assert result.dst is not None
        data = result.dst.read_bytes()
        found = [token for token in planted_tokens if token.encode() in data]
        if found:
            leaks[result.src.name] = found
    assert leaks == {}

"""The synthetic data the rest of the suite relies on: valid DICOM, readable, full of tokens."""

from __future__ import annotations

import shutil
import struct
import subprocess
import tracemalloc
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit
from wsidicom import WsiDicom

from gateway.synthetic import (
    COMPREHENSIVE_SR_STORAGE,
    PRIVATE_CREATOR,
    SECONDARY_CAPTURE_STORAGE,
    VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE,
    PlantedPHI,
    SyntheticStudy,
    write_large_volume,
    write_slide,
    write_study,
)

SEED = 11


@pytest.fixture(scope="module")
def phi() -> PlantedPHI:
    return PlantedPHI.create(SEED)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, phi: PlantedPHI) -> SyntheticStudy:
    return write_study(tmp_path_factory.mktemp("study"), phi)


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def _frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


# --------------------------------------------------------------------------
# Planted values


def test_tokens_are_deterministic_per_seed_and_distinct_between_seeds() -> None:
    first, again, other = PlantedPHI.create(1), PlantedPHI.create(1), PlantedPHI.create(2)
    assert first.all_tokens() == again.all_tokens()
    assert first.uid("study") == again.uid("study")
    assert not set(first.all_tokens()) & set(other.all_tokens())


def test_person_names_have_three_components_of_at_least_three_characters(
    phi: PlantedPHI,
) -> None:
    for name in phi.person_names():
        components = name.split("^")
        assert len(components) == 3
        assert all(len(component) >= 3 for component in components)


def test_every_token_is_planted_somewhere_in_the_study(phi: PlantedPHI, study: SyntheticStudy) -> None:
    everything = b"".join(path.read_bytes() for path in study.all_files())
    missing = [token for token in phi.all_tokens() if token.encode() not in everything]
    assert missing == []
    # The UIDs written are reported as tokens: study, series, instances.
    sr = _read(study.sr)
    assert sr.StudyInstanceUID in phi.all_tokens()
    assert sr.SOPInstanceUID in phi.all_tokens()


def test_every_wsi_instance_carries_the_header_tokens(phi: PlantedPHI, study: SyntheticStudy) -> None:
    expected = [
        phi.patient_name,
        phi.patient_id,
        phi.other_patient_id,
        phi.patient_birth_date,
        phi.accession_number,
        phi.referring_physician,
        phi.institution_name,
        phi.station_name,
        phi.device_serial_number,
        phi.container_id,
        phi.specimen_id,
        phi.specimen_detailed_description,
        phi.preparation_text,
        phi.label_text,
        phi.barcode_value,
        phi.private_token,
    ]
    for path in (p for slide in study.slides for p in slide):
        data = path.read_bytes()
        assert [t for t in expected if t.encode() not in data] == [], path.name


# --------------------------------------------------------------------------
# Reading back


def test_every_file_reads_back_and_decodes(study: SyntheticStudy) -> None:
    for path in study.all_files():
        ds = _read(path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        if ds.SOPClassUID == VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE:
            assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
            frames = _frames(ds)
            assert len(frames) == ds.NumberOfFrames
            with Image.open(BytesIO(frames[-1])) as tile:
                assert tile.format == "JPEG"
                assert tile.size == (ds.Columns, ds.Rows)
        if "PixelData" in ds:
            assert ds.pixel_array.shape[-1] == 3


def test_slide_instances_share_identifiers_and_slides_differ(study: SyntheticStudy) -> None:
    shared = (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "PyramidUID",
        "ContainerIdentifier",
    )
    per_slide = []
    for slide in study.slides:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in slide]
        values = {keyword: {str(h[keyword].value) for h in headers} for keyword in shared}
        assert all(len(v) == 1 for v in values.values()), values
        assert len({h.SOPInstanceUID for h in headers}) == len(headers)
        per_slide.append({k: v.pop() for k, v in values.items()})
    first, second = per_slide
    assert first["StudyInstanceUID"] == second["StudyInstanceUID"]
    for keyword in shared[1:]:
        assert first[keyword] != second[keyword]


def test_image_types_and_burned_in_flags(study: SyntheticStudy) -> None:
    seen: dict[str, set[str]] = {}
    for path in study.slides[0]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        flavor = str(ds.ImageType[2])
        seen.setdefault(flavor, set()).add(ds.BurnedInAnnotation)
        assert ds.SharedFunctionalGroupsSequence[0].WholeSlideMicroscopyImageFrameTypeSequence[
            0
        ].FrameType == list(ds.ImageType)
    assert seen == {"VOLUME": {"NO"}, "LABEL": {"YES"}, "OVERVIEW": {"NO"}, "THUMBNAIL": {"NO"}}


def test_concatenation_attributes(study: SyntheticStudy) -> None:
    parts = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.slides[0] if "_part" in p.name]
    assert len(parts) == 2
    assert len({p.ConcatenationUID for p in parts}) == 1
    assert len({p.SOPInstanceUIDOfConcatenationSource for p in parts}) == 1
    assert parts[0].SOPInstanceUIDOfConcatenationSource not in {p.SOPInstanceUID for p in parts}
    assert [p.InConcatenationNumber for p in parts] == [1, 2]
    assert {p.InConcatenationTotalNumber for p in parts} == {2}
    assert {p.InstanceNumber for p in parts} == {parts[0].InstanceNumber}
    assert parts[0].ConcatenationFrameOffsetNumber == 0
    assert parts[1].ConcatenationFrameOffsetNumber == parts[0].NumberOfFrames
    across = -(-parts[0].TotalPixelMatrixColumns // parts[0].Columns)
    down = -(-parts[0].TotalPixelMatrixRows // parts[0].Rows)
    assert sum(p.NumberOfFrames for p in parts) == across * down


def test_sparse_level_leaves_out_blank_tiles_and_positions_the_rest(
    study: SyntheticStudy,
) -> None:
    ds = _read(study.slides[0][0])
    assert ds.DimensionOrganizationType == "TILED_SPARSE"
    across = -(-ds.TotalPixelMatrixColumns // ds.Columns)
    down = -(-ds.TotalPixelMatrixRows // ds.Rows)
    assert 0 < ds.NumberOfFrames < across * down
    frames = ds.PerFrameFunctionalGroupsSequence
    assert len(frames) == ds.NumberOfFrames
    positions = set()
    for frame in frames:
        position = frame.PlanePositionSlideSequence[0]
        column = position.ColumnPositionInTotalImagePixelMatrix
        row = position.RowPositionInTotalImagePixelMatrix
        assert (column - 1) % ds.Columns == 0 and (row - 1) % ds.Rows == 0
        assert frame.FrameContentSequence[0].DimensionIndexValues == [
            (column - 1) // ds.Columns + 1,
            (row - 1) // ds.Rows + 1,
        ]
        positions.add((column, row))
    assert len(positions) == len(frames)
    assert (1, 1) not in positions  # the top-left corner is bare glass


def test_specimen_and_label_modules(phi: PlantedPHI, study: SyntheticStudy) -> None:
    ds = pydicom.dcmread(study.slides[0][0], stop_before_pixels=True)
    assert ds.ContainerIdentifier.startswith(phi.container_id)
    assert ds.IssuerOfTheContainerIdentifierSequence[0].LocalNamespaceEntityID == (phi.container_issuer)
    assert ds.AlternateContainerIdentifierSequence[0].ContainerIdentifier == (phi.alternate_container_id)
    assert ds.LabelText == phi.label_text
    assert ds.BarcodeValue == phi.barcode_value
    description = ds.SpecimenDescriptionSequence[0]
    assert description.SpecimenIdentifier.startswith(phi.specimen_id)
    assert description.SpecimenUID in phi.all_tokens()
    assert description.SpecimenShortDescription == phi.specimen_short_description
    assert description.SpecimenDetailedDescription == phi.specimen_detailed_description
    items = [
        item
        for step in description.SpecimenPreparationSequence
        for item in step.SpecimenPreparationStepContentItemSequence
    ]
    by_type: dict[str, list[Dataset]] = {}
    for item in items:
        by_type.setdefault(item.ValueType, []).append(item)
    assert {"TEXT", "CODE", "DATETIME"} <= set(by_type)
    texts = {item.TextValue for item in by_type["TEXT"]}
    assert {phi.part_id, phi.block_id, description.SpecimenIdentifier} <= texts
    assert any(phi.preparation_text in text for text in texts)
    codes = {
        (c.CodingSchemeDesignator, c.CodeValue) for item in by_type["CODE"] for c in item.ConceptCodeSequence
    }
    # Hematoxylin, eosin, formalin, paraffin wax, block sectioning.
    assert {
        ("SCT", "12710003"),
        ("SCT", "36879007"),
        ("SCT", "431510009"),
        ("SCT", "311731000"),
        ("SCT", "434472006"),
    } <= codes
    assert ds.OpticalPathSequence[0].ICCProfile[36:40] == b"acsp"
    origin = ds.TotalPixelMatrixOriginSequence[0]
    assert float(origin.XOffsetInSlideCoordinateSystem) > 0
    assert ds.ImagedVolumeWidth == pytest.approx(ds.TotalPixelMatrixColumns * 0.0005)


def test_private_block_has_nested_sequence_and_un_element(phi: PlantedPHI, study: SyntheticStudy) -> None:
    ds = pydicom.dcmread(study.slides[0][0], stop_before_pixels=True)
    block = ds.private_block(0x0009, PRIVATE_CREATOR)
    assert block[0x01].value == phi.private_token
    nested = block[0x03].value[0]
    assert phi.private_token in nested.private_block(0x0009, PRIVATE_CREATOR)[0x01].value
    assert block[0x04].VR == "UN"
    assert phi.patient_id.encode() in block[0x04].value


# --------------------------------------------------------------------------
# Third-party validators and viewers


def _dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return {line.strip() for line in lines if "Error" in line}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_finds_no_errors(study: SyntheticStudy) -> None:
    errors = {path: _dciodvfy_errors(path) for path in study.all_files()}
    assert len(errors) == 16  # 7 + 5 slide instances, the SR and three SCs
    partial = [
        p for p in errors if "_part" in p.name or p == study.slides[0][0]
    ]  # the concatenation parts, and the sparse base level of the first slide
    assert len(partial) == 3
    for path in partial:
        # dciodvfy checks Number of Frames against the whole Total Pixel Matrix
        # for every tiled instance. It allows neither for a level split across
        # the instances of a concatenation, where each part holds its share of
        # the frames, nor for TILED_SPARSE, where tiles of bare glass may be
        # left out. This one message is accepted for those instances only.
        part = pydicom.dcmread(path, stop_before_pixels=True)
        across = -(-part.TotalPixelMatrixColumns // part.Columns)
        down = -(-part.TotalPixelMatrixRows // part.Rows)
        accepted = (
            "Error - NumberOfFrames does not match expected value for tiled total pixel "
            f"matrix got {part.NumberOfFrames} expected {across * down} for 1 optical "
            f"paths, 1 focal planes, {down} rows of tiles, {across} columns of tiles"
        )
        assert errors.pop(path) == {accepted}
    assert {path.name: found for path, found in errors.items() if found} == {}


def test_wsidicom_opens_the_slide(study: SyntheticStudy) -> None:
    folder = study.slides[0][0].parent
    with WsiDicom.open(folder) as slide:
        assert [level.size.to_tuple() for level in slide.levels] == [
            (2048, 1536),
            (1024, 768),
            (512, 384),
        ]
        assert [level.mpp.width for level in slide.levels] == pytest.approx([0.5, 1.0, 2.0])
        tile = slide.read_tile(0, (3, 2))
        assert tile.size == (256, 256)
        assert np.asarray(tile).std() > 5  # tissue, not blank glass
        assert slide.read_label().size == (640, 640)
        assert slide.read_overview().size == (1200, 400)
        assert slide.read_thumbnail((256, 256)).width == 256


def test_concatenated_and_sparse_levels_hold_the_same_pixels_as_plain_ones(
    tmp_path: Path, phi: PlantedPHI
) -> None:
    plain = write_slide(tmp_path / "plain", phi, label=False, overview=False)
    variant = write_slide(
        tmp_path / "variant",
        phi,
        concatenated_level=0,
        concatenation_parts=3,
        sparse_level=1,
        offset_table="extended",
        label=False,
        overview=False,
    )
    assert len(variant) == len(plain) + 2
    with WsiDicom.open(plain[0].parent) as a, WsiDicom.open(variant[0].parent) as b:
        for level_a, level_b in zip(a.levels, b.levels, strict=True):
            size = level_a.size.to_tuple()
            region_a = np.asarray(a.read_region((0, 0), level_a.level, size))
            region_b = np.asarray(b.read_region((0, 0), level_b.level, size))
            assert np.array_equal(region_a, region_b)
    ds = _read(variant[0])
    assert "ExtendedOffsetTable" in ds and len(ds.ExtendedOffsetTable) == 8 * ds.NumberOfFrames


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract not installed")
def test_label_and_overview_text_is_ocr_readable(
    tmp_path: Path, phi: PlantedPHI, study: SyntheticStudy
) -> None:
    with WsiDicom.open(study.slides[0][0].parent) as slide:
        images = {"label": slide.read_label(), "overview": slide.read_overview()}
    for name, image in images.items():
        png = tmp_path / f"{name}.png"
        image.save(png)
        result = subprocess.run(
            ["tesseract", str(png), "-"], capture_output=True, text=True, check=True, timeout=60
        )
        words = set(result.stdout.split())
        assert {phi.label_text, phi.barcode_value, phi.patient_id} <= words, name


# --------------------------------------------------------------------------
# SR and SC


def test_sr_has_every_value_type_with_planted_values(phi: PlantedPHI, study: SyntheticStudy) -> None:
    ds = _read(study.sr)
    assert ds.SOPClassUID == COMPREHENSIVE_SR_STORAGE

    def walk(items: list[Dataset]) -> list[Dataset]:
        return [x for item in items for x in [item, *walk(item.get("ContentSequence", []))]]

    items = {item.ValueType: item for item in walk(ds.ContentSequence)}
    assert set(items) == {"TEXT", "PNAME", "DATE", "DATETIME", "UIDREF", "CODE", "NUM", "IMAGE"}
    assert items["TEXT"].TextValue == phi.sr_text
    assert items["PNAME"].PersonName == phi.performing_physician
    assert items["DATE"].Date == phi.patient_birth_date
    assert ds.StudyInstanceUID == items["UIDREF"].UID
    base = pydicom.dcmread(study.slides[0][0], stop_before_pixels=True)
    reference = items["IMAGE"].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == base.SOPInstanceUID
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == base.SeriesInstanceUID
    assert ds.VerifyingObserverSequence[0].VerifyingObserverName == phi.performing_physician


def test_secondary_captures_cover_each_burned_in_flag(study: SyntheticStudy) -> None:
    flags = []
    for path in study.secondary_captures:
        ds = _read(path)
        assert ds.SOPClassUID == SECONDARY_CAPTURE_STORAGE
        flags.append(ds.get("BurnedInAnnotation"))
        pixels = ds.pixel_array
        has_text = bool((pixels[:90] < 40).all(axis=-1).any())
        assert has_text == (ds.get("BurnedInAnnotation") != "NO")
    assert flags == ["YES", "NO", None]


# --------------------------------------------------------------------------
# Large volume


def test_large_volume_has_the_requested_size_and_decodable_frames(tmp_path: Path) -> None:
    target = 20_000_000
    path = write_large_volume(tmp_path / "large.dcm", target)
    assert abs(path.stat().st_size - target) < target * 0.02
    ds = _read(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    n = int(ds.NumberOfFrames)
    assert n == -(-ds.TotalPixelMatrixColumns // ds.Columns) * -(-ds.TotalPixelMatrixRows // ds.Rows)
    offsets = struct.unpack(f"<{n}Q", ds.ExtendedOffsetTable)
    lengths = struct.unpack(f"<{n}Q", ds.ExtendedOffsetTableLengths)
    frames = _frames(ds)
    assert len(frames) == n
    # The extended offset table points at each item: 8 bytes of tag and length, then the frame.
    steps = zip(offsets[:-1], offsets[1:], lengths[:-1], strict=True)
    assert all(b - a == 8 + length for a, b, length in steps)
    assert [len(frame) for frame in frames] == list(lengths)
    for index in (0, n // 2, n - 1):
        with Image.open(BytesIO(frames[index])) as tile:
            tile.load()
            assert tile.size == (ds.Columns, ds.Rows)
    with WsiDicom.open(tmp_path) as slide:
        assert slide.levels[0].size.to_tuple() == (
            ds.TotalPixelMatrixColumns,
            ds.TotalPixelMatrixRows,
        )
        assert slide.read_tile(0, (0, 0)).size == (ds.Columns, ds.Rows)


def test_large_volume_memory_does_not_grow_with_size(tmp_path: Path) -> None:
    peaks = []
    for target in (5_000_000, 40_000_000):
        tracemalloc.start()
        write_large_volume(tmp_path / f"{target}.dcm", target)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] - peaks[0] < 2_000_000

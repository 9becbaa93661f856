"""Overview redaction against real tesseract, on overviews drawn here."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageDraw, ImageFont
from pydicom import uid as dcm_uid
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import pixel_array

from gateway import synthetic
from gateway.ocr import read_words
from gateway.redact import LabelBox, RedactionReason, redact_overview

pytestmark = pytest.mark.skipif(shutil.which("tesseract") is None, reason="needs tesseract")

PLANTED = ("PHINAME7QX", "S24X99817", "MRN4417Z")
RESEARCH_IDS = ("SUBJ-3F9A2C", "SLIDE-7B21E")
WIDTH, HEIGHT = 1200, 400  # 16 pixels per mm on a 75 x 25 mm slide
LABEL_PX = 360  # the paper label, 22.5 mm


def draw_overview(
    *, label: str | None = "left", seed: int = 0, label_colour: tuple[int, int, int] = (250,) * 3
) -> np.ndarray:
    """A slide: light glass, two pink tissue sections, a printed paper label."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((HEIGHT, WIDTH, 3), np.int16)
    pixels[:] = (222, 224, 228)
    pixels += rng.integers(-4, 5, pixels.shape, dtype=np.int16)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for cx, cy, r in ((560, 200, 130), (800, 190, 100), (930, 260, 60)):
        inside = (xx - cx) ** 2 + 1.6 * (yy - cy) ** 2 < r * r
        stain = np.array((205, 125, 175)) + rng.integers(-30, 30, (HEIGHT, WIDTH, 3))
        nuclei = rng.random((HEIGHT, WIDTH)) < 0.05
        stain[nuclei] = (95, 45, 125)
        pixels[inside] = stain[inside]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if label is not None:
        draw = ImageDraw.Draw(image)
        draw.rectangle((6, 6, LABEL_PX, HEIGHT - 7), fill=label_colour)
        font = ImageFont.load_default(size=36)
        for line, token in enumerate(PLANTED):
            draw.text((24, 24 + 52 * line), token, fill=(15, 15, 15), font=font)
        for bar in range(34):
            x = 26 + bar * 9
            draw.rectangle((x, 250, x + int(rng.integers(1, 5)), 350), fill=(10, 10, 10))
        if label == "right":
            image = image.transpose(Image.Transpose.ROTATE_180)
    return np.asarray(image).copy()


def make_dataset(pixels: np.ndarray, transfer_syntax: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = dcm_uid.UID(transfer_syntax)
    ds.SOPClassUID = dcm_uid.VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = dcm_uid.generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"]
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1
    ds.PlanarConfiguration = 0
    if transfer_syntax == dcm_uid.JPEGBaseline8Bit:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=92, subsampling="4:2:2")
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "9.5"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def add_geometry(ds: pydicom.Dataset, *, spacing_mm: float, label_at_y0: bool) -> None:
    """Slide coordinates with the slide's long axis (Y) along the image rows."""
    ds.ImageOrientationSlide = [0, 1 if label_at_y0 else -1, 0, 1, 0, 0]
    origin = pydicom.Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0 if label_at_y0 else 75
    ds.TotalPixelMatrixOriginSequence = [origin]
    measures = pydicom.Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]
    shared = pydicom.Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]


def decoded(ds: pydicom.Dataset) -> np.ndarray:
    return np.asarray(pixel_array(ds))


def planted_found(pixels: np.ndarray, rotations: tuple[int, ...] = (0, 180)) -> list[str]:
    """Planted tokens OCR reads; the labels drawn here print along the long side."""
    words = read_words(Image.fromarray(pixels), rotations=rotations)
    text = " ".join(w.text.upper() for w in words)
    return [t for t in PLANTED if t in text or t[:6] in text]


def region(pixels: np.ndarray, box: LabelBox) -> np.ndarray:
    return pixels[box.top : box.bottom, box.left : box.right]


def outside_mask(box: LabelBox, margin: int = 0) -> np.ndarray:
    mask = np.ones((HEIGHT, WIDTH), bool)
    mask[:, max(0, box.left - margin) : box.right + margin] = False
    return mask


JPEG = dcm_uid.JPEGBaseline8Bit
NATIVE = dcm_uid.ExplicitVRLittleEndian


@pytest.mark.parametrize("transfer_syntax", [NATIVE, JPEG])
def test_unredacted_label_is_read_by_ocr(transfer_syntax: str) -> None:
    ds = make_dataset(draw_overview(), transfer_syntax)
    assert len(planted_found(decoded(ds))) >= 2


@pytest.mark.parametrize(("transfer_syntax", "side"), [(NATIVE, "left"), (JPEG, "right")])
def test_blackout(transfer_syntax: str, side: str) -> None:
    pixels = draw_overview(label=side)
    ds = make_dataset(pixels, transfer_syntax)
    before = decoded(ds)
    result = redact_overview(ds, mode="blackout")
    assert result.ok, (result.reason, result.detail)
    assert result.reason is None
    assert result.method == "image"
    box = result.label_box
    assert box is not None
    assert (box.top, box.bottom) == (0, HEIGHT)
    if side == "left":
        assert box.left == 0
        assert LABEL_PX <= box.right <= WIDTH // 2
    else:
        assert box.right == WIDTH
        assert WIDTH // 2 <= box.left <= WIDTH - LABEL_PX

    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert ds.BurnedInAnnotation == "NO"
    after = decoded(ds)
    assert after.shape == before.shape
    if transfer_syntax == NATIVE:
        assert not region(after, box).any()
    else:
        # Chroma upsampling blends one 2-pixel column at the box edge with its
        # neighbour; every MCU inside the box decodes to exact zeros.
        inner = box._replace(left=box.left + 2) if side == "right" else box._replace(right=box.right - 2)
        assert not region(after, inner).any()
        assert region(after, box).max() <= 8
    assert planted_found(after) == []

    unchanged = outside_mask(box, margin=16)
    difference = np.abs(after.astype(int) - before.astype(int))[unchanged]
    if transfer_syntax == NATIVE:
        assert not difference.any()
        assert "LossyImageCompression" not in ds
    else:
        assert difference.mean() < 2.0
        assert np.percentile(difference, 99) <= 12
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert ds["PixelData"].is_undefined_length
        assert ds.LossyImageCompression == "01"
        assert list(ds.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]
        assert len(ds.LossyImageCompressionRatio) == 2
        assert float(ds.LossyImageCompressionRatio[1]) > 1


def test_blackout_survives_a_file_round_trip(tmp_path: Path) -> None:
    ds = make_dataset(draw_overview(), JPEG)
    assert redact_overview(ds, mode="blackout").ok
    path = tmp_path / "overview.dcm"
    ds.save_as(path, enforce_file_format=True)
    again = pydicom.dcmread(path)
    assert again.file_meta.TransferSyntaxUID == JPEG
    assert again.BurnedInAnnotation == "NO"
    assert np.array_equal(decoded(again), decoded(ds))


def test_portrait_overview_with_the_label_at_the_bottom() -> None:
    pixels = np.ascontiguousarray(np.rot90(draw_overview(label="left"), k=1))  # label at bottom
    ds = make_dataset(pixels, NATIVE)
    result = redact_overview(ds, mode="blackout")
    assert result.ok, (result.reason, result.detail)
    box = result.label_box
    assert box is not None
    assert (box.left, box.right, box.bottom) == (0, HEIGHT, WIDTH)
    assert planted_found(decoded(ds), rotations=(90, 270)) == []


def test_geometry_gives_the_label_zone() -> None:
    ds = make_dataset(draw_overview(label="right"), NATIVE)
    add_geometry(ds, spacing_mm=75 / WIDTH, label_at_y0=False)
    result = redact_overview(ds, mode="blackout")
    assert result.ok, (result.reason, result.detail)
    assert result.method == "geometry"
    box = result.label_box
    assert box is not None
    # At least the 26 mm label zone at the right end, 16 pixels per mm.
    assert box.right == WIDTH
    assert box.left <= WIDTH - 26 * 16
    assert planted_found(decoded(ds)) == []


def test_synthetic_slide_overview(tmp_path: Path) -> None:
    phi = synthetic.PlantedPHI.create(seed=7)
    paths = synthetic.write_slide(tmp_path, phi, width=256, height=256, levels=1, label=False)
    ds = pydicom.dcmread(next(p for p in paths if p.name == "overview.dcm"))
    tokens = [t.upper() for t in phi.all_tokens() if len(t) >= 6]

    def leaked() -> list[str]:
        words = read_words(Image.fromarray(decoded(ds)), rotations=(0, 180))
        text = " ".join(w.text.upper() for w in words)
        return [t for t in tokens if t in text]

    assert leaked()
    result = redact_overview(ds, mode="blackout")
    assert result.ok, (result.reason, result.detail)
    assert result.method == "geometry"
    assert ds.SpecimenLabelInImage == "NO"
    assert leaked() == []


def test_implausible_geometry_falls_back_to_the_image() -> None:
    ds = make_dataset(draw_overview(), NATIVE)
    add_geometry(ds, spacing_mm=0.00025, label_at_y0=True)  # a VOLUME level's spacing
    result = redact_overview(ds, mode="blackout")
    assert result.ok, (result.reason, result.detail)
    assert result.method == "image"


@pytest.mark.parametrize("transfer_syntax", [NATIVE, JPEG])
def test_replace_shows_only_the_research_ids(transfer_syntax: str) -> None:
    ds = make_dataset(draw_overview(label="right"), transfer_syntax)
    result = redact_overview(ds, mode="replace", research_ids=RESEARCH_IDS)
    assert result.ok, (result.reason, result.detail)
    after = decoded(ds)
    assert planted_found(after) == []
    box = result.label_box
    assert box is not None
    words = read_words(Image.fromarray(region(after, box)))
    text = " ".join(w.text.upper() for w in words)
    for research_id in RESEARCH_IDS:
        assert research_id in text


@pytest.mark.parametrize(
    ("transfer_syntax", "photometric"),
    [
        (dcm_uid.JPEG2000Lossless, "YBR_RCT"),
        (dcm_uid.JPEG2000, "YBR_ICT"),
        (dcm_uid.RLELossless, "RGB"),
    ],
)
def test_other_families_are_reencoded_losslessly(transfer_syntax: str, photometric: str) -> None:
    pixels = draw_overview()
    ds = make_dataset(pixels, NATIVE)
    if transfer_syntax in (dcm_uid.JPEG2000Lossless, dcm_uid.JPEG2000):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG2000", no_jp2=True, irreversible=False, mct=1)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PhotometricInterpretation = photometric
    else:
        ds.compress(transfer_syntax, pixels, encoding_plugin="pydicom")
    result = redact_overview(ds, mode="blackout", ocr=False)
    assert result.ok, (result.reason, result.detail)
    box = result.label_box
    assert box is not None
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    after = decoded(ds)
    assert not region(after, box).any()
    assert np.array_equal(after[outside_mask(box)], pixels[outside_mask(box)])
    assert "LossyImageCompressionMethod" not in ds


def test_no_label_is_refused_and_left_untouched() -> None:
    ds = make_dataset(draw_overview(label=None), NATIVE)
    original = ds.PixelData
    result = redact_overview(ds, mode="blackout")
    assert not result.ok
    assert result.reason is RedactionReason.LABEL_AREA_NOT_FOUND
    assert ds.PixelData == original


def test_missing_tesseract_fails_closed() -> None:
    ds = make_dataset(draw_overview(), NATIVE)
    original = ds.PixelData
    result = redact_overview(ds, mode="blackout", tesseract_cmd="/nonexistent/tesseract")
    assert not result.ok
    assert result.reason is RedactionReason.OCR_UNAVAILABLE
    assert ds.PixelData == original
    skipped = redact_overview(ds, mode="blackout", ocr=False, tesseract_cmd="/nonexistent/x")
    assert skipped.ok


def test_text_left_outside_the_box_is_caught() -> None:
    """A second printed note on the tissue end: the OCR check must refuse it."""
    pixels = draw_overview(label="left")
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle((1000, 20, 1190, 90), fill=(250, 250, 250))
    draw.text((1010, 30), "SMITHJ", fill=(10, 10, 10), font=ImageFont.load_default(size=36))
    ds = make_dataset(np.asarray(image).copy(), NATIVE)
    original = ds.PixelData
    result = redact_overview(ds, mode="blackout")
    assert not result.ok
    assert result.reason is RedactionReason.TEXT_REMAINS
    assert "SMITH" not in result.detail
    assert ds.PixelData == original


def test_not_an_overview_is_refused() -> None:
    ds = make_dataset(draw_overview(), NATIVE)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert redact_overview(ds, mode="blackout").reason is RedactionReason.NOT_AN_OVERVIEW


def test_unsupported_transfer_syntax_keeps_its_family() -> None:
    ds = make_dataset(draw_overview(), NATIVE)
    ds.file_meta.TransferSyntaxUID = dcm_uid.JPEGExtended12Bit
    result = redact_overview(ds, mode="blackout", ocr=False)
    assert result.reason is RedactionReason.ENCODER_UNAVAILABLE


def test_replace_needs_research_ids() -> None:
    ds = make_dataset(draw_overview(), NATIVE)
    with pytest.raises(ValueError, match="research identifier"):
        redact_overview(ds, mode="replace")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pixels=arrays(
        np.uint8,
        st.tuples(st.integers(8, 120), st.integers(8, 300), st.just(3)),
        elements=st.integers(0, 255),
    ),
    mode=st.sampled_from(["blackout", "replace"]),
    transfer_syntax=st.sampled_from([NATIVE, JPEG]),
)
def test_random_images_never_crash(pixels: np.ndarray, mode: str, transfer_syntax: str) -> None:
    ds = make_dataset(np.ascontiguousarray(pixels), transfer_syntax)
    call: Callable[..., object] = redact_overview
    result = call(ds, mode=mode, research_ids=RESEARCH_IDS, ocr=False)
    assert result.ok or result.reason in set(RedactionReason)

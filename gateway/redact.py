"""Redaction of the slide label in whole-slide OVERVIEW (macro) images.

An overview shows the whole glass slide, including the paper label with the
patient's name, case number and barcode, while scanners mark it
BurnedInAnnotation NO. :func:`redact_overview` finds the label end of the
slide, blacks it out (or paints the research identifiers over it), re-encodes
the one small frame in its original transfer syntax family and checks with
OCR that no text is left. Whatever it cannot do with confidence it refuses
with a PHI-free reason, and the caller quarantines the instance.

Finding the label area
----------------------
A standard slide is 75 x 25 mm with the label on one 25 mm end; the specimen
lies on the rest.

*Geometry.* When the overview carries Image Orientation (Slide), a Total Pixel
Matrix Origin and a pixel spacing that place a 75 x 25 mm slide plausibly in
the image (axis-aligned, the long axis along the image's long side, the slide
spanning most of it), the two slide ends and the pixel scale come from there:
the label zone is the :data:`LABEL_ZONE_MM` of slide at an end, plus whatever
lies beyond the slide edge. Geometry does not say which end carries the
label: vendors differ in where they put the origin and slides are loaded
either way round. That choice is always made from the image.

*Image.* Otherwise the slide is taken to fill the image's long side. The label
is the end whose pixels show print: dark, unsaturated pixels right next to
bright ones (text and barcodes on paper), far more than the other end. Its
inner edge is where the paper colour, measured as the per-position median
colour across the short side (which text and barcode bars do not move), ends.

In both paths the box is widened to the extent of the print found at that end
and by a margin; it spans the full short side of the image. A box that would
reach the middle of the slide, or an image in which neither end clearly holds
print, is refused as ``label-area-not-found``.

OCR
---
See :mod:`gateway.ocr`. After re-encoding, the image that would be forwarded
is decoded and read at all four right-angle rotations. Text "remains" when a
word of at least :data:`MIN_WORD_CHARS` letters or digits is read
confidently enough, see :func:`_counts_as_text`. Stained tissue makes
tesseract "read" short lower-case words (``tee``, ``cee``, ``ies``) at
confidences up to the high 80s, and no longer words above about 25, while
printed label text of five or more characters is read at 65 and above. Short
words therefore count only when read at 90 or more, or at 60 or more when they
look printed (a digit, or two capitals, as label print usually is).
In ``replace`` mode the
painted box is read upright on its own and may contain only fragments of the
research identifiers; the rest of the image is read with the box zeroed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom import uid as dcm_uid
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.processing import convert_color_space
from pydicom.pixels.utils import pixel_array

from gateway.deid.report import RedactionReason
from gateway.ocr import OcrFailedError, OcrUnavailableError, OcrWord, read_words

#: Length of the label zone at one end of a 75 x 25 mm slide, label plus the
#: frosted rim around it.
LABEL_ZONE_MM: Final = 26.0
SLIDE_LENGTH_MM: Final = 75.0
SLIDE_WIDTH_MM: Final = 25.0

#: Share of the slide length searched for the label at each end when there
#: is no usable geometry (26 mm of 75 mm, rounded up).
NOMINAL_ZONE: Final = 0.35
#: A label box may not reach further into the slide than this share of it.
MAX_LABEL_SHARE: Final = 0.5
#: The paper edge must lie at least this share of the length from the end.
MIN_LABEL_SHARE: Final = 0.10
#: Margin added to the inner edge of the box, as a share of the length.
MARGIN_SHARE: Final = 0.02
#: Long side over short side below which an image is not slide-shaped.
MIN_ASPECT: Final = 1.8

#: A pixel is print when darker than this gray level, less saturated than
#: INK_MAX_SATURATION (stains are coloured, print is black) and within
#: INK_RADIUS pixels of a pixel brighter than PAPER_MIN_GRAY.
INK_MAX_GRAY: Final = 110
INK_MAX_SATURATION: Final = 60
PAPER_MIN_GRAY: Final = 170
INK_RADIUS: Final = 3
#: The label end needs this share of print pixels in its zone ...
MIN_INK_SHARE: Final = 0.002
#: ... and this many times the print share of the other end.
MIN_INK_RATIO: Final = 3.0
#: A position along the slide counts as printed when this share of the pixels
#: across it are print.
INK_LINE_SHARE: Final = 0.01
#: Print positions further apart than this share of the length are not part of
#: one label.
INK_GAP_SHARE: Final = 0.03
#: Colour distance (RGB, 0-255) that ends the paper plateau.
PAPER_EDGE_DISTANCE: Final = 18.0

MIN_WORD_CHARS: Final = 3
#: Confidence at which a word of five or more characters counts as text.
MIN_WORD_CONFIDENCE: Final = 40.0
#: Confidence at which a word of three or four characters counts as text ...
MIN_SHORT_WORD_CONFIDENCE: Final = 90.0
#: ... or, when it has a digit or two capitals, this one.
MIN_PRINTED_SHORT_WORD_CONFIDENCE: Final = 60.0
ALL_ROTATIONS: Final = (0, 90, 180, 270)

#: Quality used when a JPEG baseline overview is re-encoded. The frame is
#: small and viewed as a whole, so size matters less than fidelity.
JPEG_QUALITY: Final = 90
#: Smallest font size, in pixels, at which research identifiers are painted.
MIN_FONT_PX: Final = 10

_UNCOMPRESSED: Final = frozenset(
    {
        dcm_uid.ImplicitVRLittleEndian,
        dcm_uid.ExplicitVRLittleEndian,
        dcm_uid.DeflatedExplicitVRLittleEndian,
    }
)
_JPEG2000: Final = frozenset({dcm_uid.JPEG2000Lossless, dcm_uid.JPEG2000})
_VIA_PYDICOM: Final = frozenset({dcm_uid.RLELossless, dcm_uid.JPEGLSLossless, dcm_uid.JPEGLSNearLossless})

#: Photometric interpretations each family can carry back out, once the frame
#: has been decoded to RGB (or gray).
_PHOTOMETRICS: Final[dict[str, frozenset[str]]] = {
    "uncompressed": frozenset({"RGB", "YBR_FULL", "MONOCHROME2"}),
    "jpeg-baseline": frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "MONOCHROME2"}),
    "jpeg2000": frozenset({"RGB", "YBR_RCT", "YBR_ICT", "MONOCHROME2"}),
    "rle": frozenset({"RGB", "YBR_FULL", "MONOCHROME2"}),
    "jpeg-ls": frozenset({"RGB", "MONOCHROME2"}),
}

Mode = Literal["blackout", "replace"]
Method = Literal["geometry", "image"]
Pixels = npt.NDArray[np.uint8]


class LabelBox(NamedTuple):
    """Pixel rectangle of the stored image; ``right`` and ``bottom`` exclusive."""

    left: int
    top: int
    right: int
    bottom: int


@dataclass(frozen=True, slots=True)
class RedactionResult:
    """Outcome of :func:`redact_overview`; ``reason`` and ``detail`` are PHI-free."""

    ok: bool
    reason: RedactionReason | None
    detail: str
    label_box: LabelBox | None = None
    method: Method | None = None


class _RefusalError(Exception):
    def __init__(self, reason: RedactionReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Encoded:
    pixel_data: bytes
    encapsulated: bool
    photometric: str
    lossy_method: str | None


def redact_overview(
    ds: pydicom.Dataset,
    *,
    mode: Mode,
    research_ids: Sequence[str] = (),
    ocr: bool = True,
    tesseract_cmd: str = "tesseract",
) -> RedactionResult:
    """Black out (or replace) the slide label in an OVERVIEW image.

    ``ds`` is modified in place only when the result is ok: Pixel Data in the
    original transfer syntax family, Photometric Interpretation where the
    encoder needs another one, the Lossy Image Compression attributes when
    the frame was re-encoded lossily, and BurnedInAnnotation ``NO``.

    ``research_ids`` (the subject and slide pseudonyms) are painted over the
    label in ``replace`` mode. ``ocr=False`` skips the text check, which is
    otherwise mandatory: a missing tesseract fails with ``ocr-unavailable``.

    Raises :class:`ValueError` for an unknown mode or ``replace`` without
    identifiers; every problem with the instance itself is a result.
    """
    if mode not in ("blackout", "replace"):
        raise ValueError(f"unknown redaction mode {mode!r}")
    if mode == "replace" and not any(i.strip() for i in research_ids):
        raise ValueError("mode 'replace' needs at least one research identifier")
    box: LabelBox | None = None
    method: Method | None = None
    try:
        transfer_syntax, family = _check_instance(ds)
        original = _decode(ds)
        box, method = _locate_label(ds, original)
        if family == "jpeg-baseline":
            box = _align_to_mcu(box, original.shape[1], original.shape[0])
        painted = original.copy()
        painted[box.top : box.bottom, box.left : box.right] = 0
        if mode == "replace":
            _paint_identifiers(painted, box, research_ids)
        encoded = _encode(painted, ds, transfer_syntax, family)
        shipped = _decode(_pixel_dataset(ds, encoded, transfer_syntax))
        if ocr:
            _check_no_text(shipped, box, mode, research_ids, tesseract_cmd)
    except _RefusalError as refusal:
        return RedactionResult(False, refusal.reason, refusal.detail, box, method)
    _apply(ds, encoded, original.nbytes)
    checked = "OCR found no text" if ocr else "OCR check disabled"
    detail = f"label area {mode} from {method}; {checked}"
    return RedactionResult(True, None, detail, box, method)


def _check_instance(ds: pydicom.Dataset) -> tuple[str, str]:
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if len(image_type) < 3 or image_type[2] != "OVERVIEW":
        raise _RefusalError(RedactionReason.NOT_AN_OVERVIEW, "ImageType value 3 is not OVERVIEW")
    if "PixelData" not in ds:
        raise _RefusalError(RedactionReason.PIXEL_DATA_UNREADABLE, "no Pixel Data")
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(getattr(file_meta, "TransferSyntaxUID", ""))
    if not transfer_syntax:
        raise _RefusalError(RedactionReason.PIXEL_DATA_UNREADABLE, "no Transfer Syntax UID")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise _RefusalError(RedactionReason.UNSUPPORTED_IMAGE, "more than one frame")
    if ds.get("BitsAllocated") != 8 or ds.get("SamplesPerPixel") not in (1, 3):
        raise _RefusalError(RedactionReason.UNSUPPORTED_IMAGE, "only 8-bit gray or colour frames are handled")
    family = _family(transfer_syntax)
    if family is None:
        raise _RefusalError(
            RedactionReason.ENCODER_UNAVAILABLE, f"no encoder for transfer syntax {transfer_syntax}"
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in _PHOTOMETRICS[family]:
        raise _RefusalError(
            RedactionReason.ENCODER_UNAVAILABLE,
            f"cannot re-encode {photometric or 'unknown'} colour in {family}",
        )
    return transfer_syntax, family


def _family(transfer_syntax: str) -> str | None:
    if transfer_syntax in _UNCOMPRESSED:
        return "uncompressed"
    if transfer_syntax == dcm_uid.JPEGBaseline8Bit:
        return "jpeg-baseline"
    if transfer_syntax in _JPEG2000:
        return "jpeg2000"
    if transfer_syntax == dcm_uid.RLELossless:
        return "rle"
    if transfer_syntax in (dcm_uid.JPEGLSLossless, dcm_uid.JPEGLSNearLossless):
        return "jpeg-ls"
    return None


def _decode(ds: pydicom.Dataset) -> Pixels:
    """Decode to (rows, columns, samples) uint8, colour as RGB."""
    try:
        array = pixel_array(ds)
    except Exception as exc:
        # pydicom raises many types (missing plugin, corrupt stream, bad
        # attributes); all mean the same here, and the message may quote
        # values, so only the type is reported.
        raise _RefusalError(
            RedactionReason.PIXEL_DATA_UNREADABLE, f"decoding failed ({type(exc).__name__})"
        ) from exc
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise _RefusalError(RedactionReason.UNSUPPORTED_IMAGE, "decoded frame is not 8-bit 2-D")
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    return np.ascontiguousarray(array)


# -- finding the label ------------------------------------------------------


def _locate_label(ds: pydicom.Dataset, pixels: Pixels) -> tuple[LabelBox, Method]:
    """Return the label box of a decoded overview and how it was found.

    Raises ``_RefusalError`` (``label-area-not-found``) when no end of the slide is
    clearly the label.
    """
    rows, columns = pixels.shape[:2]
    horizontal = columns >= rows
    length = columns if horizontal else rows
    ink = _ink_profile(pixels, horizontal)
    zones = _geometry_zones(ds, rows, columns, horizontal)
    method: Method = "geometry" if zones is not None else "image"
    if zones is None:
        if length < MIN_ASPECT * min(rows, columns):
            raise _RefusalError(RedactionReason.LABEL_AREA_NOT_FOUND, "image is not slide-shaped")
        nominal = round(NOMINAL_ZONE * length)
        zones = (nominal, nominal)
    at_start = _label_end(ink, zones)
    zone = zones[0] if at_start else zones[1]
    oriented = pixels if horizontal else pixels.transpose(1, 0, 2)
    if not at_start:
        oriented = oriented[:, ::-1]
        ink = ink[::-1]
    edge = _paper_edge(oriented)
    if method == "image":
        if edge is None:
            raise _RefusalError(RedactionReason.LABEL_AREA_NOT_FOUND, "no edge of the label paper")
        extent = edge
    else:
        extent = max(zone, edge or 0)
    extent = max(extent, _ink_extent(ink, length)) + round(MARGIN_SHARE * length)
    if extent > MAX_LABEL_SHARE * length:
        raise _RefusalError(
            RedactionReason.LABEL_AREA_NOT_FOUND, "label area would reach the middle of the slide"
        )
    start, stop = (0, extent) if at_start else (length - extent, length)
    if horizontal:
        return LabelBox(start, 0, stop, rows), method
    return LabelBox(0, start, columns, stop), method


def _ink_profile(pixels: Pixels, horizontal: bool) -> npt.NDArray[np.float64]:
    """Share of print pixels at each position along the slide's long axis."""
    values = pixels.astype(np.int16)
    gray = values.mean(axis=2)
    saturation = values.max(axis=2) - values.min(axis=2)
    bright = gray > PAPER_MIN_GRAY
    near_bright = bright.copy()
    for shift in range(1, INK_RADIUS + 1):
        near_bright[shift:, :] |= bright[:-shift, :]
        near_bright[:-shift, :] |= bright[shift:, :]
        near_bright[:, shift:] |= bright[:, :-shift]
        near_bright[:, :-shift] |= bright[:, shift:]
    ink = (gray < INK_MAX_GRAY) & (saturation < INK_MAX_SATURATION) & near_bright
    profile: npt.NDArray[np.float64] = ink.mean(axis=0 if horizontal else 1)
    return profile


def _label_end(ink: npt.NDArray[np.float64], zones: tuple[int, int]) -> bool:
    """True when the label is at the start of the long axis, False at its end."""
    start_zone, end_zone = (max(1, z) for z in zones)
    start = float(ink[:start_zone].mean())
    end = float(ink[-end_zone:].mean())
    best, other = max(start, end), min(start, end)
    if best < MIN_INK_SHARE or best < MIN_INK_RATIO * other:
        raise _RefusalError(
            RedactionReason.LABEL_AREA_NOT_FOUND, "neither end of the slide clearly shows print"
        )
    return start >= end


def _paper_edge(oriented: Pixels) -> int | None:
    """Inner edge of the label paper, counted from the label end, or None.

    ``oriented`` has the slide's long axis horizontal with the label at column
    0. The median colour across the short side stays on the paper colour under
    text and barcode bars; the edge is the first position past
    :data:`MIN_LABEL_SHARE` where it leaves the paper colour for good (for a
    stretch of 1 % of the length).
    """
    length = oriented.shape[1]
    medians = np.median(oriented, axis=0).astype(np.float64)  # (length, samples)
    lo = max(1, round(MIN_LABEL_SHARE * length))
    paper = np.median(medians[round(0.02 * length) : lo], axis=0)
    distance = np.sqrt(((medians - paper) ** 2).sum(axis=1))
    away = distance > PAPER_EDGE_DISTANCE
    run = max(1, round(0.01 * length))
    hi = round(MAX_LABEL_SHARE * length)
    for position in range(lo, max(lo, hi - run)):
        if away[position : position + run].all():
            return position
    return None


def _ink_extent(ink: npt.NDArray[np.float64], length: int) -> int:
    """How far print reaches from the label end, following gaps of up to 3 %."""
    gap = max(1, round(INK_GAP_SHARE * length))
    printed = np.flatnonzero(ink[: round(MAX_LABEL_SHARE * length) + 1] >= INK_LINE_SHARE)
    if printed.size == 0 or printed[0] > NOMINAL_ZONE * length:
        return 0
    extent = int(printed[0])
    for position in printed[1:]:
        if position - extent > gap:
            break
        extent = int(position)
    return extent + 1


def _geometry_zones(ds: pydicom.Dataset, rows: int, columns: int, horizontal: bool) -> tuple[int, int] | None:
    """Label zone lengths (pixels from each image edge) from the slide geometry.

    Returns None when the instance has no geometry or it does not place an
    axis-aligned 75 x 25 mm slide across the image's long side; the caller
    then works from the image alone.
    """
    try:
        orientation = [float(v) for v in ds.ImageOrientationSlide]
        origin_item = ds.TotalPixelMatrixOriginSequence[0]
        origin = (
            float(origin_item.XOffsetInSlideCoordinateSystem),
            float(origin_item.YOffsetInSlideCoordinateSystem),
        )
        spacing = _pixel_spacing(ds)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    if spacing is None or len(orientation) != 6:
        return None
    along_row, along_column = orientation[:3], orientation[3:]
    long_dir, short_dir = (along_row, along_column) if horizontal else (along_column, along_row)
    long_spacing, short_spacing = (spacing[1], spacing[0]) if horizontal else (spacing[0], spacing[1])
    # The slide's long axis is Y, its short axis X (PS3.3 C.8.12.2.1).
    if not (abs(abs(long_dir[1]) - 1) < 0.01 and abs(abs(short_dir[0]) - 1) < 0.01):
        return None
    if not all(0.001 <= s <= 0.5 for s in (long_spacing, short_spacing)):
        return None
    length, width = (columns, rows) if horizontal else (rows, columns)
    if not 15.0 <= width * short_spacing <= 45.0:
        return None

    def position(y_mm: float) -> float:
        return (y_mm - origin[1]) / (long_spacing * long_dir[1])

    near, far = sorted((0.0, SLIDE_LENGTH_MM), key=position)
    p_near, p_far = position(near), position(far)
    if not (-0.1 * length <= p_near and p_far <= 1.1 * length and p_far - p_near >= 0.6 * length):
        return None
    toward = 1.0 if far > near else -1.0
    start_zone = position(near + toward * LABEL_ZONE_MM)
    end_zone = length - position(far - toward * LABEL_ZONE_MM)
    return max(0, round(start_zone)), max(0, round(end_zone))


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm from the shared functional groups."""
    for holder in (
        *(
            item.PixelMeasuresSequence[0]
            for item in ds.get("SharedFunctionalGroupsSequence", [])
            if item.get("PixelMeasuresSequence")
        ),
        ds,
    ):
        values = holder.get("PixelSpacing")
        if values is not None and len(values) == 2:
            return float(values[0]), float(values[1])
    return None


def _align_to_mcu(box: LabelBox, columns: int, rows: int) -> LabelBox:
    """Grow the box's inner edge to the 16-pixel JPEG MCU grid.

    Every MCU then lies wholly inside or outside the box, so no block mixes
    label and tissue and the blacked-out blocks decode to exact zeros.
    """
    mcu = 16

    def down(v: int) -> int:
        return v // mcu * mcu

    def up(v: int, limit: int) -> int:
        return min(limit, -(-v // mcu) * mcu)

    return LabelBox(
        down(box.left) if box.left > 0 else 0,
        down(box.top) if box.top > 0 else 0,
        up(box.right, columns),
        up(box.bottom, rows),
    )


# -- painting ---------------------------------------------------------------


def _paint_identifiers(pixels: Pixels, box: LabelBox, research_ids: Sequence[str]) -> None:
    """Paint the box white with the identifiers in black, centred, one a line."""
    lines = [i.strip() for i in research_ids if i.strip()]
    width, height = box.right - box.left, box.bottom - box.top
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    size = int(height / (1.6 * len(lines) + 0.5))
    while size >= MIN_FONT_PX:
        font = ImageFont.load_default(size=size)
        bounds = [draw.textbbox((0, 0), line, font=font) for line in lines]
        if max(b[2] - b[0] for b in bounds) <= 0.9 * width:
            break
        size -= 2
    else:
        raise _RefusalError(
            RedactionReason.REPLACEMENT_DOES_NOT_FIT, "research identifiers do not fit the label"
        )
    step = 1.6 * size
    top = (height - step * len(lines)) / 2
    for index, line in enumerate(lines):
        draw.text((width / 2, top + (index + 0.5) * step), line, fill=0, font=font, anchor="mm")
    region = np.asarray(canvas, dtype=np.uint8)
    pixels[box.top : box.bottom, box.left : box.right] = region[:, :, np.newaxis]


# -- encoding ---------------------------------------------------------------


def _encode(pixels: Pixels, ds: pydicom.Dataset, transfer_syntax: str, family: str) -> _Encoded:
    photometric = str(ds.PhotometricInterpretation)
    if family == "uncompressed":
        return _encode_native(pixels, photometric, int(ds.get("PlanarConfiguration", 0) or 0))
    if family == "jpeg-baseline":
        return _encode_jpeg(pixels, photometric)
    if family == "jpeg2000":
        return _encode_jpeg2000(pixels, photometric)
    return _encode_pydicom(pixels, ds, transfer_syntax, photometric)


def _encode_native(pixels: Pixels, photometric: str, planar: int) -> _Encoded:
    samples = pixels
    if photometric == "YBR_FULL":
        samples = convert_color_space(pixels, "RGB", "YBR_FULL")
    if planar == 1 and samples.shape[2] == 3:
        samples = samples.transpose(2, 0, 1)
    data = np.ascontiguousarray(samples, dtype=np.uint8).tobytes()
    if len(data) % 2:
        data += b"\x00"
    return _Encoded(data, False, photometric, None)


def _encode_jpeg(pixels: Pixels, photometric: str) -> _Encoded:
    buffer = io.BytesIO()
    if photometric == "MONOCHROME2":
        Image.fromarray(pixels[:, :, 0], "L").save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        subsampling = "4:2:2" if photometric == "YBR_FULL_422" else "4:4:4"
        Image.fromarray(pixels, "RGB").save(
            buffer,
            "JPEG",
            quality=JPEG_QUALITY,
            subsampling=subsampling,
            keep_rgb=photometric == "RGB",
        )
    return _Encoded(encapsulate([buffer.getvalue()]), True, photometric, "ISO_10918_1")


def _encode_jpeg2000(pixels: Pixels, photometric: str) -> _Encoded:
    """Reversible JPEG 2000, valid under both the lossless and the lossy UID.

    The frame is re-encoded losslessly even when it was lossy, so no further
    loss is added; an irreversible (ICT) colour transform becomes the
    reversible one (RCT).
    """
    buffer = io.BytesIO()
    if photometric == "MONOCHROME2":
        image = Image.fromarray(pixels[:, :, 0], "L")
        image.save(buffer, "JPEG2000", no_jp2=True, irreversible=False)
        return _Encoded(encapsulate([buffer.getvalue()]), True, photometric, None)
    transform = photometric != "RGB"
    Image.fromarray(pixels, "RGB").save(
        buffer, "JPEG2000", no_jp2=True, irreversible=False, mct=int(transform)
    )
    out = "YBR_RCT" if transform else "RGB"
    return _Encoded(encapsulate([buffer.getvalue()]), True, out, None)


def _encode_pydicom(pixels: Pixels, ds: pydicom.Dataset, transfer_syntax: str, photometric: str) -> _Encoded:
    """RLE and JPEG-LS through pydicom's encoders; JPEG-LS with error 0."""
    encoder = get_encoder(transfer_syntax)
    if not encoder.is_available:
        raise _RefusalError(
            RedactionReason.ENCODER_UNAVAILABLE,
            f"the encoder for {transfer_syntax} is not installed",
        )
    samples = pixels
    if photometric == "YBR_FULL":
        samples = convert_color_space(pixels, "RGB", "YBR_FULL")
    rows, columns, channels = samples.shape
    options: dict[str, Any] = {
        "rows": rows,
        "columns": columns,
        "samples_per_pixel": channels,
        "number_of_frames": 1,
        "bits_allocated": 8,
        "bits_stored": 8,
        "pixel_representation": 0,
        "photometric_interpretation": photometric,
        "planar_configuration": 0,
    }
    if transfer_syntax == dcm_uid.JPEGLSNearLossless:
        options["jls_error"] = 0
    frame = samples[:, :, 0] if channels == 1 else samples
    try:
        data = encoder.encode(np.ascontiguousarray(frame), **options)
    except (RuntimeError, ValueError) as exc:
        raise _RefusalError(
            RedactionReason.ENCODER_UNAVAILABLE, f"encoding failed ({type(exc).__name__})"
        ) from exc
    return _Encoded(encapsulate([data]), True, photometric, None)


def _pixel_dataset(ds: pydicom.Dataset, encoded: _Encoded, transfer_syntax: str) -> pydicom.Dataset:
    """A dataset holding only the re-encoded frame, to decode it for checking."""
    out = pydicom.Dataset()
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = dcm_uid.UID(transfer_syntax)
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored"):
        setattr(out, keyword, ds.get(keyword))
    out.HighBit = 7
    out.PixelRepresentation = 0
    out.NumberOfFrames = 1
    out.PhotometricInterpretation = encoded.photometric
    if ds.SamplesPerPixel == 3:
        out.PlanarConfiguration = 0 if encoded.encapsulated else ds.get("PlanarConfiguration", 0)
    out.PixelData = encoded.pixel_data
    out["PixelData"].VR = "OB"
    return out


def _apply(ds: pydicom.Dataset, encoded: _Encoded, raw_bytes: int) -> None:
    ds.PixelData = encoded.pixel_data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = encoded.encapsulated
    ds.PhotometricInterpretation = encoded.photometric
    if encoded.encapsulated and ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    # The offset tables described the old fragments.
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)
    if encoded.lossy_method is not None:
        # PS3.3 C.7.6.1.1.5: once lossy, always "01"; each lossy step appends
        # its ratio and method, in the order applied.
        compressed = len(encoded.pixel_data)
        ratios = [str(v) for v in _as_list(ds.get("LossyImageCompressionRatio"))]
        methods = [str(v) for v in _as_list(ds.get("LossyImageCompressionMethod"))]
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = [*ratios, f"{raw_bytes / compressed:.2f}"]
        ds.LossyImageCompressionMethod = [*methods, encoded.lossy_method]
    ds.BurnedInAnnotation = "NO"
    if "SpecimenLabelInImage" in ds:
        ds.SpecimenLabelInImage = "NO"


def _as_list(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return list(value)
    return [value]


# -- OCR check --------------------------------------------------------------


def _check_no_text(
    shipped: Pixels,
    box: LabelBox,
    mode: Mode,
    research_ids: Sequence[str],
    tesseract_cmd: str,
) -> None:
    outside = shipped.copy()
    outside[box.top : box.bottom, box.left : box.right] = 0
    try:
        found = _significant(
            read_words(_image(outside), tesseract_cmd=tesseract_cmd, rotations=ALL_ROTATIONS)
        )
        if found:
            raise _RefusalError(
                RedactionReason.TEXT_REMAINS,
                f"OCR read {len(found)} word(s) outside the label area",
            )
        if mode == "replace":
            inside = shipped[box.top : box.bottom, box.left : box.right]
            allowed = [_normalise(i) for i in research_ids]
            foreign = [
                w
                for w in _significant(read_words(_image(inside), tesseract_cmd=tesseract_cmd))
                if not any(_normalise(w.text) in a for a in allowed)
            ]
            if foreign:
                raise _RefusalError(
                    RedactionReason.TEXT_REMAINS,
                    f"OCR read {len(foreign)} word(s) in the label area that are not research identifiers",
                )
    except OcrUnavailableError as exc:
        raise _RefusalError(RedactionReason.OCR_UNAVAILABLE, "tesseract cannot be run") from exc
    except OcrFailedError as exc:
        raise _RefusalError(RedactionReason.OCR_FAILED, str(exc)) from exc


def _image(pixels: Pixels) -> Image.Image:
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[:, :, 0], "L")
    return Image.fromarray(pixels, "RGB")


def _normalise(text: str) -> str:
    return "".join(c for c in text.upper() if c.isalnum())


def _significant(words: Sequence[OcrWord]) -> list[OcrWord]:
    return [word for word in words if _counts_as_text(word)]


def _counts_as_text(word: OcrWord) -> bool:
    """Whether an OCR word is evidence of text rather than texture.

    Thresholds from reading tissue-only and label images drawn at overview
    resolution; see the module docstring.
    """
    chars = _normalise(word.text)
    if len(chars) < MIN_WORD_CHARS:
        return False
    if len(chars) >= 5:
        return word.confidence >= MIN_WORD_CONFIDENCE
    printed = any(c.isdigit() for c in chars) or sum(c.isupper() for c in word.text) >= 2
    threshold = MIN_PRINTED_SHORT_WORD_CONFIDENCE if printed else MIN_SHORT_WORD_CONFIDENCE
    return word.confidence >= threshold

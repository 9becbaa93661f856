"""Pixel policies: which images may leave with their pixels unchanged.

Until the pixels of an image are cleaned, an image that may show identity in
its pixels does not pass: LABEL images never; OVERVIEW images only redacted
(scanners mark them BurnedInAnnotation NO although the slide label shows in
them) or with an explicit acknowledgement; any other image marked
BurnedInAnnotation or RecognizableVisualFeatures YES, or leaving
BurnedInAnnotation out where its IOD allows text in the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from gateway.deid.profile import PixelPolicy
from gateway.deid.report import Outcome

#: SOP Classes whose IODs allow burned-in text without saying so: the Secondary
#: Capture family and photographic images.
TEXT_IN_PIXELS_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image Storage
        "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image Storage
    }
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
WSI_IMAGE_FLAVORS = ("LABEL", "OVERVIEW", "THUMBNAIL", "VOLUME")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the pixel policy says of one image."""

    outcome: Outcome
    reason: str | None = None
    detail: str = ""
    redact: str | None = None  # "redact" or "replace" when the overview is to be redacted


def image_flavor(header: Dataset) -> str | None:
    """The WSI image flavor (ImageType value 3), or any value naming LABEL or
    OVERVIEW, since some writers put it elsewhere in ImageType."""
    values = [str(v).upper() for v in (header.get("ImageType") or ())]
    for flavor in ("LABEL", "OVERVIEW"):
        if flavor in values:
            return flavor
    if len(values) >= 3 and values[2] in WSI_IMAGE_FLAVORS:
        return values[2]
    return None


def judge(header: Dataset, has_pixels: bool, policy: PixelPolicy) -> Verdict:
    """Apply the pixel policy to an instance header."""
    flavor = image_flavor(header)
    if str(header.get("SOPClassUID", "")) in policy.drop_sop_classes:
        return Verdict(Outcome.DROPPED, "sop-class-dropped", "the profile drops this SOP Class")
    if flavor == "LABEL":
        return Verdict(Outcome.DROPPED, "label-image", "LABEL images are never forwarded")
    if flavor == "OVERVIEW":
        if policy.overview == "drop":
            return Verdict(Outcome.DROPPED, "overview-image", "profile drops OVERVIEW images")
        if policy.overview in ("redact", "replace"):
            return Verdict(Outcome.PASSED, redact=policy.overview)
        return Verdict(Outcome.PASSED)  # keep, acknowledged in the profile
    if flavor == "THUMBNAIL" and policy.thumbnail == "drop":
        return Verdict(Outcome.DROPPED, "thumbnail-image", "the profile drops THUMBNAIL images")
    if not has_pixels:
        return Verdict(Outcome.PASSED)
    stop = Outcome.DROPPED if policy.burned_in == "drop" else Outcome.QUARANTINED
    burned_in = str(header.get("BurnedInAnnotation", "")).strip().upper()
    if burned_in == "YES":
        return Verdict(stop, "burned-in-annotation", "BurnedInAnnotation is YES")
    if str(header.get("RecognizableVisualFeatures", "")).strip().upper() == "YES":
        return Verdict(stop, "recognizable-visual-features", "RecognizableVisualFeatures is YES")
    if not burned_in and str(header.get("SOPClassUID", "")) in TEXT_IN_PIXELS_SOP_CLASSES:
        return Verdict(
            stop,
            "burned-in-annotation-unknown",
            "BurnedInAnnotation is absent and this IOD allows text in the pixels",
        )
    return Verdict(Outcome.PASSED)


def has_pixel_data(header: Dataset) -> bool:
    """True when the dataset holds any pixel data element."""
    return any(keyword in header for keyword in _PIXEL_KEYWORDS)

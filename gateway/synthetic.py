"""Synthetic DICOM instances full of planted, distinctive fake PHI.

Every identifying value written here is a made-up token such as ``PHIPATNAMEK4W``:
easy to grep for in an output file, impossible to confuse with anything a
de-identifier would legitimately keep. The test suite, the benchmarks and the
README tour build their inputs with this module, so no real patient data ever
has to enter the repository.

The instances aim to be what a real scanner would send, so that the
de-identifier is exercised on realistic structure rather than on a toy:

- :func:`write_slide` writes one VL Whole Slide Microscopy slide: a pyramid of
  JPEG baseline tiled VOLUME levels (optionally one of them split into a
  concatenation and one of them TILED_SPARSE), a LABEL image, an OVERVIEW image
  and optionally a THUMBNAIL, with the Specimen, Slide Label and Optical Path
  modules filled and a private vendor block;
- :func:`write_large_volume` streams one very large VOLUME instance to disk for
  benchmarks, with flat memory use;
- :func:`write_sr` writes a Comprehensive SR whose content tree carries PHI in
  every value type a de-identifier must handle;
- :func:`write_secondary_capture` writes a Secondary Capture with or without
  burned-in text;
- :func:`write_study` bundles all of these for one patient.

:meth:`PlantedPHI.all_tokens` lists every string that must never appear in a
de-identified output.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import random
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal

import highdicom as hd
import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageFont
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

__all__ = [
    "COMPREHENSIVE_SR_STORAGE",
    "SECONDARY_CAPTURE_STORAGE",
    "VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE",
    "PlantedPHI",
    "SyntheticStudy",
    "write_large_volume",
    "write_secondary_capture",
    "write_slide",
    "write_sr",
    "write_study",
]

VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.77.1.6")
COMPREHENSIVE_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.33")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

#: Private creator of the fake scanner vendor's private block.
PRIVATE_CREATOR = "SYNTHETIC SCANNER VENDOR 1"
_PRIVATE_GROUP = 0x0009

# Characters for token suffixes. Letters and digits that OCR engines confuse
# (O/0, I/1/L, S/5, B/8, Z/2) are left out so that text rendered into label
# pixels can be read back exactly.
_SUFFIX_ALPHABET = "ACDEFGHJKMNPQRTUVWXY"
_DIGITS = "34679"
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

_MANUFACTURER = "Synthetic Slide Scanners"
_MODEL = "SynthScan 400"
_SOFTWARE_VERSION = "1.0"
_JPEG_QUALITY = 90
# Physical size of a glass slide in mm, and the part of it taken by the label.
_SLIDE_WIDTH_MM = 75.0
_SLIDE_HEIGHT_MM = 25.0
_LABEL_WIDTH_MM = 25.0
# Base level sampling: 0.5 micrometre per pixel, a 20x scan.
_BASE_PIXEL_SPACING_MM = 0.0005
# Where the scanned area starts on the slide, in mm.
_SCAN_ORIGIN_MM = (5.0, 30.0)
# Illumination and illumination colour of a bright-field scan.
_BRIGHTFIELD = Code("111744", "DCM", "Brightfield illumination")


def _written_dates(date: dt.date) -> tuple[str, ...]:
    """The ways a date shows up in free text, beyond the DA form."""
    month = _MONTHS[date.month - 1]
    return (
        f"{date.day} {month} {date.year}",
        f"{month} {date.day}, {date.year}",
        f"{date.day:02d}.{date.month:02d}.{date.year}",
        f"{date.month:02d}/{date.day:02d}/{date.year}",
        date.isoformat(),
    )


@dataclass
class PlantedPHI:
    """The fake identifiers of one synthetic patient.

    Build one with :meth:`create`; two different seeds give two patients with
    no token in common. Person names are DICOM PN values with three components
    of at least three characters each, so that a de-identifier that handles
    only the family name is caught. Times are not listed as tokens: a six-digit
    time is too likely to occur by chance inside a fresh UID.
    """

    seed: int
    patient_name: str
    patient_id: str
    issuer_of_patient_id: str
    other_patient_id: str
    patient_birth_date: str
    patient_address: str
    patient_telephone: str
    patient_history: str
    study_date: str
    study_time: str
    acquisition_datetime: str
    accession_number: str
    study_id: str
    study_description: str
    series_description: str
    referring_physician: str
    performing_physician: str
    operator_name: str
    institution_name: str
    institution_address: str
    department_name: str
    station_name: str
    device_serial_number: str
    container_id: str
    container_issuer: str
    alternate_container_id: str
    specimen_id: str
    block_id: str
    part_id: str
    specimen_issuer: str
    specimen_short_description: str
    specimen_detailed_description: str
    preparation_text: str
    label_text: str
    barcode_value: str
    image_comments: str
    private_token: str
    sr_text: str
    written_dates: tuple[str, ...]
    _uids: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, seed: int = 0) -> PlantedPHI:
        """Planted values for one patient, derived deterministically from ``seed``."""
        rng = random.Random(seed)  # noqa: S311 - fake test data, not security
        tag = "".join(rng.choice(_SUFFIX_ALPHABET) for _ in range(3))
        num = "".join(rng.choice(_DIGITS) for _ in range(4))
        birth = dt.date(rng.randint(1930, 1985), rng.randint(1, 12), rng.randint(1, 28))
        study = dt.date(rng.randint(2015, 2023), rng.randint(1, 12), rng.randint(1, 28))
        study_time = f"{rng.randint(8, 17):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
        birth_written = _written_dates(birth)
        study_written = _written_dates(study)

        def pn(kind: str) -> str:
            return f"PHI{kind}FAM{tag}^PHI{kind}GIV{tag}^PHI{kind}MID{tag}"

        return cls(
            seed=seed,
            patient_name=f"PHIPATNAME{tag}^PHIGIVEN{tag}^PHIMIDDLE{tag}",
            patient_id=f"PHIPID{num}",
            issuer_of_patient_id=f"PHIISSUER{tag}",
            other_patient_id=f"PHIOPID{num}",
            patient_birth_date=birth.strftime("%Y%m%d"),
            patient_address=f"{num} PHISTREET{tag} Road, PHICITY{tag}",
            patient_telephone=f"+99 {num} {num}",
            patient_history=(
                f"PHIHISTORY{tag} born {birth_written[1]}; biopsy {study_written[2]}, "
                f"reviewed {study_written[3]} and {study_written[4]}"
            ),
            study_date=study.strftime("%Y%m%d"),
            study_time=study_time,
            acquisition_datetime=study.strftime("%Y%m%d") + study_time,
            accession_number=f"PHIACC{tag}{num}",
            study_id=f"PHISTUDY{tag}",
            study_description=f"PHISTUDYDESC{tag} biopsy of {birth_written[0]}",
            series_description=f"PHISERIESDESC{tag}",
            referring_physician=pn("REF"),
            performing_physician=pn("PERF"),
            operator_name=pn("OPER"),
            institution_name=f"PHIINST{tag} General Hospital",
            institution_address=f"{num} PHIINSTSTREET{tag} Avenue",
            department_name=f"PHIDEPT{tag} Pathology",
            station_name=f"PHISTATION{tag}",
            device_serial_number=f"PHISERIAL{tag}{num}",
            container_id=f"PHICONT{tag}{num}",
            container_issuer=f"PHICISSUER{tag}",
            alternate_container_id=f"PHIALTCONT{tag}",
            specimen_id=f"PHISPEC{tag}",
            block_id=f"PHIBLOCK{tag}",
            part_id=f"PHIPART{tag}",
            specimen_issuer=f"PHISISSUER{tag}",
            specimen_short_description=f"PHISHORTDESC{tag}",
            specimen_detailed_description=(
                f"PHIDETAILDESC{tag} received {study_written[1]} for patient born {birth_written[2]}"
            ),
            preparation_text=f"PHIPREP{tag} stained on {study_written[0]}",
            label_text=f"PHILABEL{tag}",
            barcode_value=f"PHIBARCODE{tag}{num}",
            image_comments=f"PHICOMMENT{tag} born {birth_written[3]}",
            private_token=f"PHIPRIV{tag}",
            sr_text=f"PHISRTEXT{tag} seen {birth_written[4]}",
            written_dates=birth_written + study_written,
        )

    def uid(self, purpose: str) -> str:
        """A UID for ``purpose``, the same on every call, recorded as a token.

        The UIDs are derived from the seed so that a slide written twice gets
        the same identifiers, and they count as PHI: an original UID must never
        survive de-identification.
        """
        if purpose not in self._uids:
            self._uids[purpose] = str(generate_uid(entropy_srcs=[str(self.seed), purpose]))
        return self._uids[purpose]

    def all_tokens(self) -> list[str]:
        """Every string that must not survive de-identification.

        Person names are listed both whole and per component. UIDs are those
        handed out by :meth:`uid` so far, so call this after writing.
        """
        tokens: list[str] = [
            self.patient_id,
            self.issuer_of_patient_id,
            self.other_patient_id,
            self.patient_birth_date,
            self.patient_address,
            self.patient_telephone,
            self.patient_history,
            self.study_date,
            self.accession_number,
            self.study_id,
            self.study_description,
            self.series_description,
            self.institution_name,
            self.institution_address,
            self.department_name,
            self.station_name,
            self.device_serial_number,
            self.container_id,
            self.container_issuer,
            self.alternate_container_id,
            self.specimen_id,
            self.block_id,
            self.part_id,
            self.specimen_issuer,
            self.specimen_short_description,
            self.specimen_detailed_description,
            self.preparation_text,
            self.label_text,
            self.barcode_value,
            self.image_comments,
            self.private_token,
            self.sr_text,
            *self.written_dates,
        ]
        for name in self.person_names():
            tokens.append(name)
            tokens.extend(name.split("^"))
        tokens.extend(self._uids.values())
        return list(dict.fromkeys(tokens))

    def person_names(self) -> tuple[str, ...]:
        """All planted PN values."""
        return (
            self.patient_name,
            self.referring_physician,
            self.performing_physician,
            self.operator_name,
        )


# --------------------------------------------------------------------------
# Pixels


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font: no dependency on system fonts."""
    return ImageFont.load_default(size=size)


def _tissue_image(width: int, height: int, seed: int) -> Image.Image:
    """An H&E-looking picture: pink tissue with purple nuclei on white glass.

    The tissue is an ellipse that leaves the corners empty, so that a sparse
    level has blank tiles to leave out.
    """
    rng = np.random.default_rng(seed)
    yy = np.arange(height, dtype=np.float32)[:, np.newaxis]
    xx = np.arange(width, dtype=np.float32)[np.newaxis, :]
    inside = ((xx - width / 2) / (width * 0.45)) ** 2 + ((yy - height / 2) / (height * 0.42)) ** 2
    mask = inside < 1.0
    texture = rng.normal(0.0, 12.0, size=(height, width)).astype(np.float32)
    stroma = np.sin(xx / 23.0) * np.cos(yy / 31.0) * 18.0
    rgb = np.full((height, width, 3), 245.0, dtype=np.float32)
    for channel, base in enumerate((232.0, 160.0, 196.0)):
        rgb[..., channel] = np.where(mask, base + stroma + texture, rgb[..., channel])
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    n_nuclei = width * height // 900
    centres = rng.uniform((0, 0), (width, height), size=(n_nuclei, 2))
    for x, y in centres:
        if mask[int(y), int(x)]:
            r = float(rng.uniform(2.0, 5.0))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(92, 48, 140))
    return image


def _text_card(size: tuple[int, int], lines: Sequence[str], font_size: int) -> Image.Image:
    """Black text on white, one line under the other, as printed on a slide label."""
    card = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(card)
    font = _font(font_size)
    y = font_size // 2
    for line in lines:
        draw.text((font_size // 2, y), line, fill="black", font=font)
        y += int(font_size * 1.6)
    return card


def _label_lines(phi: PlantedPHI, container_id: str) -> list[str]:
    return [phi.label_text, container_id, phi.patient_id, phi.barcode_value]


def _encode_jpeg(image: Image.Image, quality: int = _JPEG_QUALITY) -> bytes:
    """JPEG baseline with 4:2:2 chroma subsampling, hence YBR_FULL_422."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=1)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Tile:
    """One encoded frame and its 1-based pixel position in the total matrix."""

    data: bytes
    column: int
    row: int


def _tiles(image: Image.Image, tile_size: int, *, skip_blank: bool) -> list[_Tile]:
    """Cut ``image`` into full-size tiles, padding the right and bottom edges white.

    With ``skip_blank`` a tile holding nothing but glass is left out, as a
    scanner writing TILED_SPARSE does.
    """
    tiles: list[_Tile] = []
    for top in range(0, image.height, tile_size):
        for left in range(0, image.width, tile_size):
            right = min(left + tile_size, image.width)
            bottom = min(top + tile_size, image.height)
            tile = Image.new("RGB", (tile_size, tile_size), (245, 245, 245))
            tile.paste(image.crop((left, top, right, bottom)))
            if skip_blank and int(np.asarray(tile).min()) >= 240:
                continue
            tiles.append(_Tile(_encode_jpeg(tile), left + 1, top + 1))
    return tiles


# --------------------------------------------------------------------------
# Shared header modules


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _ds(value: float) -> str:
    """A decimal string that fits the 16 characters DS allows."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8e}"


def _patient_study(ds: Dataset, phi: PlantedPHI) -> None:
    """Patient, General Study and Patient Study modules."""
    ds.PatientName = phi.patient_name
    ds.PatientID = phi.patient_id
    ds.IssuerOfPatientID = phi.issuer_of_patient_id
    other = Dataset()
    other.PatientID = phi.other_patient_id
    other.IssuerOfPatientID = phi.issuer_of_patient_id
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = _seq(other)
    ds.PatientBirthDate = phi.patient_birth_date
    ds.PatientSex = "F"
    ds.PatientAddress = phi.patient_address
    ds.PatientTelephoneNumbers = phi.patient_telephone
    ds.StudyInstanceUID = phi.uid("study")
    ds.StudyDate = phi.study_date
    ds.StudyTime = phi.study_time
    ds.ReferringPhysicianName = phi.referring_physician
    ds.StudyID = phi.study_id
    ds.AccessionNumber = phi.accession_number
    ds.StudyDescription = phi.study_description
    ds.AdditionalPatientHistory = phi.patient_history


def _equipment(ds: Dataset, phi: PlantedPHI) -> None:
    """General and Enhanced General Equipment modules."""
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = _MODEL
    ds.SoftwareVersions = _SOFTWARE_VERSION
    ds.DeviceSerialNumber = phi.device_serial_number
    ds.InstitutionName = phi.institution_name
    ds.InstitutionAddress = phi.institution_address
    ds.InstitutionalDepartmentName = phi.department_name
    ds.StationName = phi.station_name


def _sop_common(ds: Dataset, sop_class: str, sop_instance: str, phi: PlantedPHI) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = phi.study_date
    ds.InstanceCreationTime = phi.study_time
    ds.InstanceCreatorUID = phi.uid("instance-creator")
    ds.TimezoneOffsetFromUTC = "+0000"


def _private_block(ds: Dataset, phi: PlantedPHI) -> None:
    """A vendor private block: text, a nested private sequence and a UN element.

    The UN element stands for a private element whose VR the receiving side
    does not know, as happens after an implicit VR hop.
    """
    block = ds.private_block(_PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", phi.private_token)
    block.add_new(0x02, "LT", f"{phi.private_token} operator {phi.operator_name}")
    nested = Dataset()
    nested_block = nested.private_block(_PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    nested_block.add_new(0x01, "LO", f"{phi.private_token}NESTED")
    nested_block.add_new(0x05, "PN", phi.patient_name)
    block.add_new(0x03, "SQ", _seq(nested))
    unknown = f"{phi.private_token}UN {phi.patient_id}".encode("ascii")
    ds.add(DataElement(block.get_tag(0x04), "UN", unknown + b" " * (len(unknown) % 2)))


def _file_meta(ds: Dataset, transfer_syntax: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DEIDGW_SYNTH"
    ds.file_meta = meta


# --------------------------------------------------------------------------
# Whole slide images


@dataclass(frozen=True)
class _Slide:
    """Values shared by every instance of one slide."""

    phi: PlantedPHI
    number: int
    container_id: str
    series_uid: str
    frame_of_reference_uid: str
    pyramid_uid: str
    dimension_organization_uid: str
    specimen_uid: str
    icc_profile: bytes

    @property
    def specimen_id(self) -> str:
        return f"{self.phi.specimen_id}{_slide_suffix(self.number)}"


def _slide_suffix(number: int) -> str:
    """``number`` spelt in the OCR-safe alphabet, to tell the slides of one patient apart."""
    if number < 1:
        raise ValueError(f"slide numbers start at 1, got {number}")
    digits = ""
    while number:
        number, rest = divmod(number - 1, len(_SUFFIX_ALPHABET))
        digits = _SUFFIX_ALPHABET[rest] + digits
    return digits


def _slide_context(phi: PlantedPHI, number: int) -> _Slide:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _Slide(
        phi=phi,
        number=number,
        container_id=f"{phi.container_id}{_slide_suffix(number)}",
        series_uid=phi.uid(f"slide{number}/series"),
        frame_of_reference_uid=phi.uid(f"slide{number}/frame-of-reference"),
        pyramid_uid=phi.uid(f"slide{number}/pyramid"),
        dimension_organization_uid=phi.uid(f"slide{number}/dimension-organization"),
        specimen_uid=phi.uid(f"slide{number}/specimen"),
        icc_profile=srgb,
    )


def _processing_datetime(phi: PlantedPHI, hours: int) -> dt.datetime:
    study = dt.datetime.strptime(phi.acquisition_datetime, "%Y%m%d%H%M%S")
    return study - dt.timedelta(hours=hours)


def _specimen_description(slide: _Slide) -> Dataset:
    """The Specimen Description of the tissue section, with its whole history.

    Following TID 8001, the steps of the ancestors (the part taken at surgery
    and the paraffin block cut from it) are listed in the section's own
    preparation sequence, each under the identifier of the specimen it acted on.
    """
    phi = slide.phi
    issuer = hd.IssuerOfIdentifier(phi.specimen_issuer)
    steps = [
        hd.SpecimenPreparationStep(
            specimen_id=phi.part_id,
            processing_procedure=hd.SpecimenCollection(procedure=codes.SCT.Excision),
            processing_description=phi.preparation_text,
            processing_datetime=_processing_datetime(phi, 72),
            issuer_of_specimen_id=issuer,
        ),
        hd.SpecimenPreparationStep(
            specimen_id=phi.part_id,
            processing_procedure=hd.SpecimenProcessing(description=f"{phi.preparation_text} fixed"),
            fixative=codes.SCT.Formalin,
            issuer_of_specimen_id=issuer,
        ),
        hd.SpecimenPreparationStep(
            specimen_id=phi.block_id,
            processing_procedure=hd.SpecimenSampling(
                method=codes.SCT.Dissection,
                parent_specimen_id=phi.part_id,
                parent_specimen_type=codes.SCT.GrossSpecimen,
                issuer_of_parent_specimen_id=issuer,
            ),
            issuer_of_specimen_id=issuer,
        ),
        hd.SpecimenPreparationStep(
            specimen_id=phi.block_id,
            processing_procedure=hd.SpecimenProcessing(description=f"{phi.preparation_text} embedded"),
            embedding_medium=codes.SCT.ParaffinWax,
            issuer_of_specimen_id=issuer,
        ),
        hd.SpecimenPreparationStep(
            specimen_id=slide.specimen_id,
            processing_procedure=hd.SpecimenSampling(
                method=codes.SCT.BlockSectioning,
                parent_specimen_id=phi.block_id,
                parent_specimen_type=codes.SCT.TissueSpecimen,
                issuer_of_parent_specimen_id=issuer,
            ),
            issuer_of_specimen_id=issuer,
        ),
        hd.SpecimenPreparationStep(
            specimen_id=slide.specimen_id,
            processing_procedure=hd.SpecimenStaining(
                substances=[codes.SCT.HematoxylinStain, codes.SCT.WaterSolubleEosinStain]
            ),
            processing_description=phi.preparation_text,
            processing_datetime=_processing_datetime(phi, 24),
            issuer_of_specimen_id=issuer,
        ),
    ]
    description: Dataset = hd.SpecimenDescription(
        specimen_id=slide.specimen_id,
        specimen_uid=slide.specimen_uid,
        specimen_location=f"{phi.specimen_short_description} centre of slide",
        specimen_preparation_steps=steps,
        issuer_of_specimen_id=issuer,
        primary_anatomic_structures=[codes.SCT.Colon],
        specimen_type=codes.SCT.TissueSection,
        specimen_short_description=phi.specimen_short_description,
        specimen_detailed_description=phi.specimen_detailed_description,
    )
    return description


def _specimen_module(ds: Dataset, slide: _Slide) -> None:
    phi = slide.phi
    ds.ContainerIdentifier = slide.container_id
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = phi.container_issuer
    ds.IssuerOfTheContainerIdentifierSequence = _seq(issuer)
    alternate = Dataset()
    alternate.ContainerIdentifier = phi.alternate_container_id
    alt_issuer = Dataset()
    alt_issuer.LocalNamespaceEntityID = phi.container_issuer
    alternate.IssuerOfTheContainerIdentifierSequence = _seq(alt_issuer)
    ds.AlternateContainerIdentifierSequence = _seq(alternate)
    ds.ContainerTypeCodeSequence = _seq(_code_item(codes.SCT.MicroscopeSlide))
    ds.SpecimenDescriptionSequence = _seq(_specimen_description(slide))


def _optical_path(ds: Dataset, slide: _Slide) -> None:
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.OpticalPathDescription = "Brightfield"
    path.IlluminationTypeCodeSequence = _seq(_code_item(_BRIGHTFIELD))
    path.IlluminationColorCodeSequence = _seq(_code_item(codes.SCT.FullSpectrum))
    path.ICCProfile = slide.icc_profile
    path.ColorSpace = "SRGB"
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = _seq(path)


ImageFlavor = Literal["VOLUME", "LABEL", "OVERVIEW", "THUMBNAIL"]
OffsetTable = Literal["basic", "extended"]


@dataclass(frozen=True)
class _Geometry:
    """Size and placement of one WSI instance in the slide coordinate system."""

    columns: int
    rows: int
    tile_size: tuple[int, int]  # (columns, rows) of one frame
    pixel_spacing: float  # mm, square pixels
    origin: tuple[float, float]  # mm


def _wsi_dataset(
    slide: _Slide,
    flavor: ImageFlavor,
    geometry: _Geometry,
    sop_instance_uid: str,
    instance_number: int,
    number_of_frames: int,
) -> Dataset:
    """Everything but the pixel data and frame-layout attributes of a WSI instance."""
    phi = slide.phi
    ds = Dataset()
    _sop_common(ds, VL_WHOLE_SLIDE_MICROSCOPY_IMAGE_STORAGE, sop_instance_uid, phi)
    _patient_study(ds, phi)
    ds.Modality = "SM"
    ds.SeriesInstanceUID = slide.series_uid
    ds.SeriesNumber = slide.number
    ds.SeriesDescription = phi.series_description
    ds.SeriesDate = phi.study_date
    ds.SeriesTime = phi.study_time
    ds.PerformingPhysicianName = phi.performing_physician
    ds.OperatorsName = phi.operator_name
    ds.FrameOfReferenceUID = slide.frame_of_reference_uid
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    _equipment(ds, phi)
    ds.AcquisitionUID = phi.uid(f"slide{slide.number}/acquisition")
    ds.AcquisitionDateTime = phi.acquisition_datetime
    ds.ContentDate = phi.study_date
    ds.ContentTime = phi.study_time
    ds.InstanceNumber = instance_number
    ds.ImageComments = phi.image_comments
    ds.PyramidUID = slide.pyramid_uid
    ds.PyramidLabel = f"{slide.container_id} pyramid"
    ds.AcquisitionContextSequence = DicomSequence()

    derivation = "RESAMPLED" if flavor == "THUMBNAIL" else "NONE"
    image_type = ["ORIGINAL", "PRIMARY", flavor, derivation]
    ds.ImageType = image_type
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.Columns, ds.Rows = geometry.tile_size
    ds.NumberOfFrames = number_of_frames
    ds.TotalPixelMatrixColumns = geometry.columns
    ds.TotalPixelMatrixRows = geometry.rows
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = _ds(geometry.origin[0])
    origin.YOffsetInSlideCoordinateSystem = _ds(geometry.origin[1])
    ds.TotalPixelMatrixOriginSequence = _seq(origin)
    ds.ImageOrientationSlide = [0, 1, 0, 1, 0, 0]
    ds.ImagedVolumeWidth = geometry.columns * geometry.pixel_spacing  # mm
    ds.ImagedVolumeHeight = geometry.rows * geometry.pixel_spacing  # mm
    ds.ImagedVolumeDepth = 4.0  # micrometres, unlike width and height
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = _ds(15.0)
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.SpecimenLabelInImage = "YES" if flavor in ("LABEL", "OVERVIEW") else "NO"
    # Scanners mark the overview NO even though the label shows in it: the flag
    # cannot be trusted for macro images, which is what the gateway must handle.
    ds.BurnedInAnnotation = "YES" if flavor == "LABEL" else "NO"
    ds.RecognizableVisualFeatures = "NO"

    _specimen_module(ds, slide)
    _optical_path(ds, slide)
    ds.LabelText = phi.label_text
    ds.BarcodeValue = phi.barcode_value

    measures = Dataset()
    measures.PixelSpacing = [_ds(geometry.pixel_spacing), _ds(geometry.pixel_spacing)]
    measures.SliceThickness = _ds(0.004)
    frame_type = Dataset()
    frame_type.FrameType = image_type
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(measures)
    shared.WholeSlideMicroscopyImageFrameTypeSequence = _seq(frame_type)
    shared.OpticalPathIdentificationSequence = _seq(optical)
    ds.SharedFunctionalGroupsSequence = _seq(shared)

    organization = Dataset()
    organization.DimensionOrganizationUID = slide.dimension_organization_uid
    ds.DimensionOrganizationSequence = _seq(organization)
    indices = []
    for pointer in (0x0048021E, 0x0048021F):  # column, row position in total matrix
        index = Dataset()
        index.DimensionOrganizationUID = slide.dimension_organization_uid
        index.DimensionIndexPointer = pointer
        index.FunctionalGroupPointer = 0x0048021A  # Plane Position (Slide) Sequence
        indices.append(index)
    ds.DimensionIndexSequence = _seq(*indices)
    ds.DimensionOrganizationType = "TILED_FULL"

    _private_block(ds, phi)
    return ds


def _sparse_layout(ds: Dataset, tiles: Sequence[_Tile], geometry: _Geometry) -> None:
    """Per-frame positions for TILED_SPARSE (Plane Position (Slide) per frame)."""
    ds.DimensionOrganizationType = "TILED_SPARSE"
    per_frame = []
    tile_columns, tile_rows = geometry.tile_size
    for tile in tiles:
        position = Dataset()
        position.ColumnPositionInTotalImagePixelMatrix = tile.column
        position.RowPositionInTotalImagePixelMatrix = tile.row
        # ImageOrientationSlide 0\1\0\1\0\0: columns run along Y, rows along X.
        position.XOffsetInSlideCoordinateSystem = _ds(
            geometry.origin[0] + (tile.row - 1) * geometry.pixel_spacing
        )
        position.YOffsetInSlideCoordinateSystem = _ds(
            geometry.origin[1] + (tile.column - 1) * geometry.pixel_spacing
        )
        position.ZOffsetInSlideCoordinateSystem = _ds(0.0)
        content = Dataset()
        content.DimensionIndexValues = [
            (tile.column - 1) // tile_columns + 1,
            (tile.row - 1) // tile_rows + 1,
        ]
        frame = Dataset()
        frame.FrameContentSequence = _seq(content)
        frame.PlanePositionSlideSequence = _seq(position)
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)


def _set_pixel_data(ds: Dataset, frames: Sequence[bytes], offset_table: OffsetTable) -> None:
    if offset_table == "extended":
        data, offsets, lengths = encapsulate_extended(list(frames))
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        data = encapsulate(list(frames), has_bot=True)
    ds.add(DataElement(0x7FE00010, "OB", data, is_undefined_length=True))


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> Path:
    _file_meta(ds, transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def _single_frame_image(
    slide: _Slide,
    flavor: ImageFlavor,
    image: Image.Image,
    pixel_spacing: float,
    origin: tuple[float, float],
    instance_number: int,
    path: Path,
) -> Path:
    geometry = _Geometry(image.width, image.height, image.size, pixel_spacing, origin)
    uid = slide.phi.uid(f"slide{slide.number}/{flavor.lower()}")
    ds = _wsi_dataset(slide, flavor, geometry, uid, instance_number, 1)
    # Higher quality so that the text on the label stays crisp.
    _set_pixel_data(ds, [_encode_jpeg(image, quality=95)], "basic")
    return _save(ds, path, JPEGBaseline8Bit)


def _overview_image(slide: _Slide, width: int) -> Image.Image:
    """The whole glass slide seen from above: label at the left end, tissue in the rest."""
    phi = slide.phi
    height = round(width * _SLIDE_HEIGHT_MM / _SLIDE_WIDTH_MM)
    label_width = round(width * _LABEL_WIDTH_MM / _SLIDE_WIDTH_MM)
    overview = Image.new("RGB", (width, height), (228, 232, 236))
    tissue = _tissue_image(width - label_width - 40, height - 60, phi.seed + slide.number)
    overview.paste(tissue, (label_width + 20, 30))
    card = _text_card((label_width, height), _label_lines(phi, slide.container_id), max(12, height // 12))
    overview.paste(card, (0, 0))
    return overview


def write_slide(
    directory: Path,
    phi: PlantedPHI,
    *,
    slide_number: int = 1,
    width: int = 2048,
    height: int = 1536,
    tile_size: int = 256,
    levels: int = 3,
    concatenated_level: int | None = None,
    concatenation_parts: int = 2,
    sparse_level: int | None = None,
    offset_table: OffsetTable = "basic",
    label: bool = True,
    overview: bool = True,
    thumbnail: bool = False,
) -> list[Path]:
    """Write one whole slide as VL Whole Slide Microscopy instances.

    Level 0 is the ``width`` x ``height`` base; each further level halves it.
    ``concatenated_level`` splits that level into ``concatenation_parts``
    instances of a concatenation; ``sparse_level`` writes that level
    TILED_SPARSE, leaving out tiles of bare glass. The label and overview
    images show the label text and barcode value in large black-on-white
    letters. ``slide_number`` tells slides of one study apart: it is appended
    to the container and specimen identifiers and seeds the slide's UIDs.
    ``offset_table`` chooses between a Basic Offset Table in the Pixel Data and
    an Extended Offset Table in the header for the VOLUME levels.

    Returns the paths written, in the order levels, label, overview, thumbnail.
    """
    directory.mkdir(parents=True, exist_ok=True)
    slide = _slide_context(phi, slide_number)
    base = _tissue_image(width, height, phi.seed * 1000 + slide_number)
    imaged_width_mm = width * _BASE_PIXEL_SPACING_MM
    paths: list[Path] = []
    instance_number = 1
    for level in range(levels):
        factor = 2**level
        size = (math.ceil(width / factor), math.ceil(height / factor))
        image = base if level == 0 else base.resize(size, Image.Resampling.LANCZOS)
        geometry = _Geometry(
            size[0], size[1], (tile_size, tile_size), imaged_width_mm / size[0], _SCAN_ORIGIN_MM
        )
        sparse = level == sparse_level
        tiles = _tiles(image, tile_size, skip_blank=sparse)
        parts = concatenation_parts if level == concatenated_level else 1
        chunk = math.ceil(len(tiles) / parts)
        source_uid = phi.uid(f"slide{slide_number}/level{level}")
        for part in range(parts):
            part_tiles = tiles[part * chunk : (part + 1) * chunk]
            uid = source_uid if parts == 1 else phi.uid(f"slide{slide_number}/level{level}/{part}")
            ds = _wsi_dataset(slide, "VOLUME", geometry, uid, instance_number, len(part_tiles))
            if parts > 1:
                ds.ConcatenationUID = phi.uid(f"slide{slide_number}/level{level}/concatenation")
                ds.SOPInstanceUIDOfConcatenationSource = source_uid
                ds.ConcatenationFrameOffsetNumber = part * chunk
                ds.InConcatenationNumber = part + 1
                ds.InConcatenationTotalNumber = parts
            if sparse:
                _sparse_layout(ds, part_tiles, geometry)
            _set_pixel_data(ds, [tile.data for tile in part_tiles], offset_table)
            suffix = f"_part{part + 1}" if parts > 1 else ""
            paths.append(_save(ds, directory / f"level{level}{suffix}.dcm", JPEGBaseline8Bit))
        # All parts of a concatenation share the Instance Number.
        instance_number += 1
    if label:
        label_image = _text_card((640, 640), _label_lines(phi, slide.container_id), 48)
        paths.append(
            _single_frame_image(
                slide,
                "LABEL",
                label_image,
                _LABEL_WIDTH_MM / label_image.width,
                (0.0, 0.0),
                instance_number,
                directory / "label.dcm",
            )
        )
        instance_number += 1
    if overview:
        overview_image = _overview_image(slide, 1200)
        paths.append(
            _single_frame_image(
                slide,
                "OVERVIEW",
                overview_image,
                _SLIDE_WIDTH_MM / overview_image.width,
                (0.0, 0.0),
                instance_number,
                directory / "overview.dcm",
            )
        )
        instance_number += 1
    if thumbnail:
        thumb = base.copy()
        thumb.thumbnail((512, 512))
        paths.append(
            _single_frame_image(
                slide,
                "THUMBNAIL",
                thumb,
                imaged_width_mm / thumb.width,
                _SCAN_ORIGIN_MM,
                instance_number,
                directory / "thumbnail.dcm",
            )
        )
    return paths


# --------------------------------------------------------------------------
# Large volume for benchmarks


def _grid_for(frames: int) -> tuple[int, int]:
    """Tiles across and down whose product is at least ``frames`` and closest to it.

    TILED_FULL needs a full rectangle of tiles; among rectangles no more
    elongated than 1:4, pick the one that wastes the fewest frames.
    """
    best = (frames, 1)
    best_waste = math.inf
    for across in range(max(1, math.isqrt(frames // 4)), math.isqrt(frames * 4) + 2):
        down = math.ceil(frames / across)
        if not 1 / 4 <= across / down <= 4:
            continue
        waste = across * down - frames
        if waste < best_waste:
            best, best_waste = (across, down), waste
    return best


def _item(length: int) -> bytes:
    """An encapsulated item tag (FFFE,E000) with its 32-bit length."""
    return struct.pack("<HHI", 0xFFFE, 0xE000, length)


def write_large_volume(
    path: Path,
    target_bytes: int,
    phi: PlantedPHI | None = None,
    *,
    tile_size: int = 512,
    distinct_tiles: int = 8,
) -> Path:
    """Write one VOLUME instance of about ``target_bytes`` with real JPEG tiles.

    Memory stays flat whatever the size: ``distinct_tiles`` tiles are encoded
    once and cycled, and the encapsulated Pixel Data is written frame by frame
    after the header. Frame offsets are known up front, so the header carries
    an Extended Offset Table (the Basic Offset Table is left empty; its 32-bit
    offsets could not address past 4 GiB anyway).
    """
    phi = phi if phi is not None else PlantedPHI.create()
    slide = _slide_context(phi, 1)
    source = _tissue_image(tile_size * distinct_tiles, tile_size, phi.seed)
    pool = [
        _encode_jpeg(source.crop((i * tile_size, 0, (i + 1) * tile_size, tile_size)))
        for i in range(distinct_tiles)
    ]
    pool = [data + b"\x00" * (len(data) % 2) for data in pool]
    mean_item = sum(len(data) + 8 for data in pool) / len(pool)
    # Each frame also costs 16 bytes of extended offset table.
    across, down = _grid_for(max(1, round(target_bytes / (mean_item + 16))))
    n_frames = across * down
    lengths = [len(pool[i % distinct_tiles]) for i in range(n_frames)]
    offsets = [0] * n_frames
    for i in range(1, n_frames):
        offsets[i] = offsets[i - 1] + 8 + lengths[i - 1]

    geometry = _Geometry(
        across * tile_size,
        down * tile_size,
        (tile_size, tile_size),
        _BASE_PIXEL_SPACING_MM,
        _SCAN_ORIGIN_MM,
    )
    uid = phi.uid(f"large-volume/{target_bytes}")
    ds = _wsi_dataset(slide, "VOLUME", geometry, uid, 1, n_frames)
    ds.ExtendedOffsetTable = struct.pack(f"<{n_frames}Q", *offsets)
    ds.ExtendedOffsetTableLengths = struct.pack(f"<{n_frames}Q", *lengths)
    _file_meta(ds, JPEGBaseline8Bit)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        dcmwrite(out, ds, enforce_file_format=True)
        _write_pixel_data(out, (pool[i % distinct_tiles] for i in range(n_frames)))
    return path


def _write_pixel_data(out: BinaryIO, frames: Iterator[bytes]) -> None:
    """Append encapsulated Pixel Data, one frame per item, with an empty Basic Offset Table."""
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    out.write(_item(0))
    for frame in frames:
        out.write(_item(len(frame)))
        out.write(frame)
    out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


# --------------------------------------------------------------------------
# Structured report


def _content_item(value_type: str, name: Code, relationship: str = "CONTAINS") -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = _seq(_code_item(name))
    return item


def _series(ds: Dataset, phi: PlantedPHI, modality: str, purpose: str, number: int) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = phi.uid(f"{purpose}/series")
    ds.SeriesNumber = number
    ds.SeriesDescription = phi.series_description
    ds.SeriesDate = phi.study_date
    ds.SeriesTime = phi.study_time
    ds.OperatorsName = phi.operator_name


def write_sr(
    path: Path,
    phi: PlantedPHI,
    referenced: Path,
) -> Path:
    """Write a Comprehensive SR of a pathology finding on the slide instance ``referenced``.

    The content tree has one item of each value type a de-identifier must look
    into: TEXT, PNAME, DATE, DATETIME, UIDREF, CODE, NUM and IMAGE, all holding
    planted values. The document is VERIFIED, so the verifying observer's name
    and organisation are in the header too.
    """
    from pydicom import dcmread

    target = dcmread(referenced, stop_before_pixels=True)
    ds = Dataset()
    _sop_common(ds, COMPREHENSIVE_SR_STORAGE, phi.uid("sr/instance"), phi)
    _patient_study(ds, phi)
    _series(ds, phi, "SR", "sr", 900)
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = phi.institution_name
    ds.StationName = phi.station_name
    ds.DeviceSerialNumber = phi.device_serial_number
    ds.InstanceNumber = 1
    ds.ContentDate = phi.study_date
    ds.ContentTime = phi.study_time
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = phi.performing_physician
    observer.VerifyingOrganization = phi.institution_name
    observer.VerificationDateTime = phi.acquisition_datetime
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence()
    ds.VerifyingObserverSequence = _seq(observer)
    ds.PerformedProcedureCodeSequence = DicomSequence()

    sop = Dataset()
    sop.ReferencedSOPClassUID = target.SOPClassUID
    sop.ReferencedSOPInstanceUID = target.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = target.SeriesInstanceUID
    series.ReferencedSOPSequence = _seq(sop)
    evidence = Dataset()
    evidence.StudyInstanceUID = target.StudyInstanceUID
    evidence.ReferencedSeriesSequence = _seq(series)
    ds.CurrentRequestedProcedureEvidenceSequence = _seq(evidence)

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _seq(_code_item(Code("11526-1", "LN", "Pathology study")))
    ds.ContinuityOfContent = "SEPARATE"

    text = _content_item("TEXT", codes.DCM.Comment)
    text.TextValue = phi.sr_text
    person = _content_item("PNAME", codes.DCM.PersonObserverName, "HAS OBS CONTEXT")
    person.PersonName = phi.performing_physician
    date = _content_item("DATE", codes.DCM.StudyDate)
    date.Date = phi.patient_birth_date
    started = _content_item("DATETIME", Code("111526", "DCM", "DateTime Started"))
    started.DateTime = phi.acquisition_datetime
    study = _content_item("UIDREF", codes.DCM.StudyInstanceUID)
    study.UID = target.StudyInstanceUID
    finding = _content_item("CODE", codes.DCM.Finding)
    finding.ConceptCodeSequence = _seq(_code_item(codes.SCT.Adenocarcinoma))
    length = _content_item("NUM", codes.SCT.Length)
    measured = Dataset()
    measured.NumericValue = _ds(3.2)
    measured.MeasurementUnitsCodeSequence = _seq(_code_item(codes.UCUM.Millimeter))
    length.MeasuredValueSequence = _seq(measured)
    image = _content_item("IMAGE", codes.DCM.SourceOfMeasurement, "INFERRED FROM")
    image.ReferencedSOPSequence = _seq(sop)
    length.ContentSequence = _seq(image)
    ds.ContentSequence = _seq(person, text, date, started, study, finding, length)
    _private_block(ds, phi)
    return _save(ds, path, ExplicitVRLittleEndian)


# --------------------------------------------------------------------------
# Secondary capture


def write_secondary_capture(path: Path, phi: PlantedPHI, burned_in: bool | None) -> Path:
    """Write a Secondary Capture, a screenshot-like picture of a slide.

    ``burned_in`` sets BurnedInAnnotation to YES or NO, or leaves it out when
    ``None``. Whenever the flag is not NO, the pixels show the patient's name
    and ID: an absent flag is exactly the case where a gateway cannot trust the
    header and must assume text is there.
    """
    picture = _tissue_image(640, 480, phi.seed + 7)
    if burned_in is not False:
        draw = ImageDraw.Draw(picture)
        font = _font(28)
        draw.rectangle((0, 0, 640, 90), fill="white")
        draw.text((12, 8), phi.patient_name.split("^")[0], fill="black", font=font)
        draw.text((12, 48), phi.patient_id, fill="black", font=font)
    purpose = {True: "yes", False: "no", None: "absent"}[burned_in]
    ds = Dataset()
    _sop_common(ds, SECONDARY_CAPTURE_STORAGE, phi.uid(f"sc/{purpose}/instance"), phi)
    _patient_study(ds, phi)
    _series(ds, phi, "OT", f"sc/{purpose}", 910)
    ds.Laterality = ""
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = phi.institution_name
    ds.StationName = phi.station_name
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate = phi.study_date
    ds.ContentTime = phi.study_time
    ds.DateOfSecondaryCapture = phi.study_date
    ds.TimeOfSecondaryCapture = phi.study_time
    ds.ImageComments = phi.image_comments
    if burned_in is not None:
        ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = picture.height
    ds.Columns = picture.width
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = picture.tobytes()
    _private_block(ds, phi)
    return _save(ds, path, ExplicitVRLittleEndian)


# --------------------------------------------------------------------------
# Study


@dataclass(frozen=True)
class SyntheticStudy:
    """The files of one synthetic study, by kind."""

    slides: list[list[Path]]
    sr: Path
    secondary_captures: list[Path]

    def all_files(self) -> list[Path]:
        return [*(p for slide in self.slides for p in slide), self.sr, *self.secondary_captures]


def write_study(directory: Path, phi: PlantedPHI, *, slides: int = 2) -> SyntheticStudy:
    """Write a whole study of one patient: ``slides`` slides, an SR and three SCs.

    The first slide has a sparse base level and its second level split into a
    concatenation, the others are plain; the SR points at the first slide's base
    level; the Secondary Captures cover BurnedInAnnotation YES, NO and absent.
    """
    slide_paths = [
        write_slide(
            directory / f"slide{n}",
            phi,
            slide_number=n,
            concatenated_level=1 if n == 1 else None,
            sparse_level=0 if n == 1 else None,
            thumbnail=n == 1,
        )
        for n in range(1, slides + 1)
    ]
    sr = write_sr(directory / "report.dcm", phi, slide_paths[0][0])
    captures = [
        write_secondary_capture(directory / f"capture_{name}.dcm", phi, flag)
        for name, flag in (("yes", True), ("no", False), ("absent", None))
    ]
    return SyntheticStudy(slide_paths, sr, captures)

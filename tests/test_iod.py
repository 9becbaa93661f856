"""The engine's index of attribute Types agrees with highdicom's own tables."""

from __future__ import annotations

from highdicom._standard_utils import (
    does_iod_have_pixel_data,
    get_module_attribute_map,
    get_sop_class_iod_map,
)

from gateway.deid.iod import _module_types, _needed_keywords, attribute_type, iod_has_pixel_data


def test_line_reader_agrees_with_highdicoms_tables() -> None:
    needed = _needed_keywords()
    ours = _module_types()
    theirs = get_module_attribute_map()
    assert set(ours) == set(theirs)
    for module, attributes in theirs.items():
        expected = {(tuple(a["path"]), a["keyword"]): a["type"] for a in attributes if a["keyword"] in needed}
        assert ours[module] == expected, module


def test_types_in_the_whole_slide_iod() -> None:
    wsi = "1.2.840.10008.5.1.4.1.1.77.1.6"
    assert attribute_type(wsi, (), "ContainerIdentifier") == "1"
    assert attribute_type(wsi, ("SpecimenDescriptionSequence",), "SpecimenIdentifier") == "1"
    assert attribute_type(wsi, (), "BarcodeValue") == "2"
    assert attribute_type(wsi, (), "PatientName") == "2"
    assert attribute_type("1.2.3.4", (), "PatientName") is None


def test_pixel_data_presence_agrees_with_highdicom() -> None:
    compared = 0
    for sop_class in get_sop_class_iod_map():
        try:
            expected = does_iod_have_pixel_data(sop_class)
        except KeyError:  # highdicom's tables lack a module of this IOD
            continue
        assert iod_has_pixel_data(sop_class) == expected, sop_class
        compared += 1
    assert compared > 150
    assert not iod_has_pixel_data("1.2.3.4")

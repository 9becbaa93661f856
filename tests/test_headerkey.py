"""Header keys and the receive-time check that reuses them.

Instances of one series have one key whatever their per-instance values, and
a different key as soon as any other byte of the header differs. The check
through a known key must refuse whatever the full structure check refuses.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.deid.headerkey import CheckedHeaders, header_key
from gateway.deid.stream import check_file
from gateway.receive import _contradicts_request

UIDS = st.integers(min_value=1, max_value=2**128 - 1).map(lambda n: f"2.25.{n}")
NUMBERS = st.integers(min_value=1, max_value=2**31 - 1)


def write(template: Dataset, path: Path, uid: str, number: int, **changes: str) -> Path:
    ds = copy.deepcopy(template)  # Dataset.copy() shares the elements
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = number
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.tuples(UIDS, NUMBERS), b=st.tuples(UIDS, NUMBERS))
def test_one_series_has_one_key_and_any_other_change_another(
    tmp_path: Path, volume_level: Dataset, a: tuple[str, int], b: tuple[str, int]
) -> None:
    first = header_key(write(volume_level, tmp_path / "a.dcm", *a))
    second = header_key(write(volume_level, tmp_path / "b.dcm", *b))
    other = header_key(write(volume_level, tmp_path / "c.dcm", *b, ContentTime="101010"))
    assert first is not None and second is not None and other is not None
    assert first.key == second.key != other.key
    assert str(second.per_instance.SOPInstanceUID) == b[0]
    assert int(second.per_instance.InstanceNumber) == b[1]


def _patched(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


def _wrong_group_length(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    at = data.index(b"\x02\x00\x00\x00UL\x04\x00") + 8
    (value,) = struct.unpack_from("<L", data, at)
    struct.pack_into("<L", data, at, value + 2)
    path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


def _other_meta_instance(path: Path) -> Path:
    ds = dcmread(path)
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.99"
    ds.save_as(path, enforce_file_format=False)
    return path


#: Changes to an instance of a known series, and whether the full check refuses
#: the result (it reads past a wrong file meta group length, as pydicom does).
BAD = {
    "instance UID with a VR the dictionary contradicts": (
        lambda p: _patched(p, b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00LO"), True
    ),
    "instance number read with the wrong length field": (
        lambda p: _patched(p, b"\x20\x00\x13\x00IS", b"\x20\x00\x13\x00UN"), True
    ),
    "file meta group length wrong": (_wrong_group_length, False),
    "pixel data cut short": (_truncated, True),
    "file meta names another instance": (_other_meta_instance, True),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_known_header_does_not_let_a_broken_instance_through(
    tmp_path: Path, volume_level: Dataset, case: str
) -> None:
    """Each broken instance gets the full check's verdict, not the known header's."""
    checked = CheckedHeaders()
    good = write(volume_level, tmp_path / "good.dcm", "2.25.1234", 1)
    assert checked.check(good) is None
    again = write(volume_level, tmp_path / "again.dcm", "2.25.5678", 2)
    assert checked.check(again) is None
    assert (checked.hits, checked.misses) == (1, 1)
    change, refused = BAD[case]
    bad = change(write(volume_level, tmp_path / "bad.dcm", "2.25.9012", 3))
    full = check_file(bad)
    assert (full is not None) == refused
    assert checked.check(bad) == full
    assert (checked.hits, checked.misses) == (1, 2)


def test_the_key_and_pydicom_find_the_same_identity_and_contradictions(
    tmp_path: Path, volume_level: Dataset
) -> None:
    """The receiver compares the request with the UIDs in the key when there
    is one, and with pydicom's reading of the file otherwise: both agree."""
    path = write(volume_level, tmp_path / "a.dcm", "2.25.77", 7)
    key = header_key(path)
    raw_key = header_key(path, decoded=False)  # the receiver's: no value decoded
    assert key is not None and raw_key is not None
    assert (raw_key.key, raw_key.pixel_extent) == (key.key, key.pixel_extent)
    ds = dcmread(path, stop_before_pixels=True)
    for found in (key, raw_key):
        assert found.sop_class_uid == str(ds.SOPClassUID)
        assert found.sop_instance_uid == str(ds.SOPInstanceUID) == "2.25.77"
    assert raw_key.per_instance.InstanceNumber == 7  # decoded when asked for
    for sop_class, instance, expected in [
        (str(ds.SOPClassUID), "2.25.77", False),
        ("1.2.840.10008.5.1.4.1.1.7", "2.25.77", True),
        (str(ds.SOPClassUID), "2.25.78", True),
    ]:
        assert _contradicts_request(path, key, sop_class, instance) is expected
        assert _contradicts_request(path, raw_key, sop_class, instance) is expected
        assert _contradicts_request(path, None, sop_class, instance) is expected

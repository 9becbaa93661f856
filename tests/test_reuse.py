"""Reuse of a de-identified header across the instances of a series.

Every instance is de-identified twice, by an engine that reuses headers and
by one that never does, and the two results must be the same bytes and the
same report. The reusing engine must actually reuse (its hit count), and
must fall back to a full run whenever a per-instance value could carry an
identifying value into the shared header.
"""

from __future__ import annotations

import copy
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.deid import Deidentifier, Outcome, SecretKey, load_profile
from gateway.deid.report import DeidReport
from gateway.deid.reuse import HeaderMemo
from gateway.deid.stream import fill_pixels

#: Long random UIDs under 2.25: no one is a part of another, or of the header.
UIDS = st.integers(min_value=10**30, max_value=2**128 - 1).map(lambda n: f"2.25.{n}")
NUMBERS = st.integers(min_value=1, max_value=2**31 - 1)
SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def write_instance(
    template: Dataset, path: Path, uid: str, number: int, comments: str | None = None
) -> Path:
    ds = copy.deepcopy(template)  # Dataset.copy() shares the elements
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = number
    if comments is not None:
        ds.ImageComments = comments
    ds.save_as(path, enforce_file_format=True)
    return path


def same_result(
    reusing: Deidentifier, full: Deidentifier, src: Path, out: Path
) -> DeidReport:
    """De-identify ``src`` with both engines; assert equal results; return one report."""
    a, b = out / "reused.dcm", out / "full.dcm"
    a.unlink(missing_ok=True)
    b.unlink(missing_ok=True)
    report = reusing.deidentify_file(src, a, durable=False)
    expected = full.deidentify_file(src, b, durable=False)
    assert report.public() == expected.public()
    assert report.uid_map == expected.uid_map
    assert report.patient_map == expected.patient_map
    assert a.is_file() == b.is_file()
    if b.is_file():
        assert a.read_bytes() == b.read_bytes()
    return report


def engines(key: SecretKey, profile: str = "research") -> tuple[Deidentifier, Deidentifier]:
    loaded = load_profile(profile)
    return Deidentifier(loaded, key), Deidentifier(loaded, key, reuse_headers=False)


def engines_with_rule(tmp_path: Path, key: SecretKey, rule: str) -> tuple[Deidentifier, Deidentifier]:
    """:func:`engines` for the research profile with one more rule (YAML under ``rules:``)."""
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"name: custom\nextends: research\nrules:\n{rule}", encoding="utf-8")
    return engines(key, str(profile))


@SETTINGS
@given(instances=st.lists(st.tuples(UIDS, NUMBERS), min_size=2, max_size=5, unique_by=lambda t: t[0]))
def test_a_reused_header_is_what_a_full_run_writes(
    tmp_path: Path, key: SecretKey, volume_level: Dataset, instances: list[tuple[str, int]]
) -> None:
    reusing, full = engines(key)
    assert reusing.memo is not None
    for index, (uid, number) in enumerate(instances):
        src = write_instance(volume_level, tmp_path / f"in-{index}.dcm", uid, number)
        report = same_result(reusing, full, src, tmp_path)
        assert report.outcome is Outcome.PASSED
        assert uid.encode() not in (tmp_path / "reused.dcm").read_bytes()
    assert (reusing.memo.hits, reusing.memo.misses) == (len(instances) - 1, 1)


@SETTINGS
@given(instances=st.lists(st.tuples(UIDS, NUMBERS), min_size=2, max_size=4, unique_by=lambda t: t[0]))
def test_pixel_data_by_reference_fills_to_the_same_bytes(
    tmp_path: Path, key: SecretKey, volume_level: Dataset, instances: list[tuple[str, int]]
) -> None:
    """Left in the input (full run and reused header alike), the pixel data
    goes back to the same place: the filled file is the copied one."""
    reusing, full = engines(key)
    for index, (uid, number) in enumerate(instances):
        src = write_instance(volume_level, tmp_path / f"in-{index}.dcm", uid, number)
        copied, referenced = tmp_path / "copied.dcm", tmp_path / "referenced.dcm"
        full.deidentify_file(src, copied, durable=False)
        report = reusing.deidentify_file(src, referenced, durable=False, pixels_by_reference=True)
        reference = report.pixel_reference
        assert reference is not None and reference.source == src
        assert referenced.stat().st_size == copied.stat().st_size - (reference.end - reference.start)
        fill_pixels(referenced, reference)
        assert referenced.read_bytes() == copied.read_bytes()
    assert reusing.memo is not None and reusing.memo.hits == len(instances) - 1


@SETTINGS
@given(uids=st.lists(UIDS, min_size=3, max_size=3, unique=True), number=NUMBERS)
def test_an_instance_whose_uid_the_shared_header_names_takes_a_full_run(
    tmp_path: Path, key: SecretKey, volume_level: Dataset, uids: list[str], number: int
) -> None:
    """A profile keeps Image Comments as they are, and they name the later
    instances' UIDs: harmless text for the first instance, an identifying
    value for each of those instances, which the full run quarantines."""
    reusing, full = engines_with_rule(
        tmp_path, key, "  - attribute: ImageComments\n    action: K\n    why: a test of the output scan\n"
    )
    assert reusing.memo is not None
    comments = f"see {uids[1]} and {uids[2]}"
    outcomes = []
    for index, uid in enumerate(uids):
        src = write_instance(volume_level, tmp_path / f"in-{index}.dcm", uid, number + index, comments)
        outcomes.append(same_result(reusing, full, src, tmp_path).outcome)
    assert outcomes == [Outcome.PASSED, Outcome.QUARANTINED, Outcome.QUARANTINED]
    assert reusing.memo.hits == 0


def test_a_changed_shared_attribute_is_a_new_header(
    tmp_path: Path, key: SecretKey, volume_level: Dataset
) -> None:
    reusing, full = engines(key)
    assert reusing.memo is not None
    first = write_instance(volume_level, tmp_path / "a.dcm", "2.25.1234567890123456789012345678901", 1)
    same_result(reusing, full, first, tmp_path)
    other = copy.deepcopy(volume_level)
    other.ContentTime = "101010"
    second = write_instance(other, tmp_path / "b.dcm", "2.25.1234567890123456789012345678902", 2)
    same_result(reusing, full, second, tmp_path)
    third = write_instance(volume_level, tmp_path / "c.dcm", "2.25.1234567890123456789012345678903", 3)
    same_result(reusing, full, third, tmp_path)
    assert (reusing.memo.hits, reusing.memo.misses) == (1, 2)


def test_an_action_that_depends_on_more_than_the_value_is_not_reused(
    tmp_path: Path, key: SecretKey, volume_level: Dataset
) -> None:
    """A profile that replaces Instance Number: the first run's output cannot
    tell how to treat another number, so every instance takes a full run."""
    reusing, full = engines_with_rule(
        tmp_path,
        key,
        "  - attribute: InstanceNumber\n    action: replace\n    value: '7'\n"
        "    why: the archive numbers instances itself\n",
    )
    assert reusing.memo is not None
    for index in range(3):
        uid = f"2.25.{10**31 + index}"
        src = write_instance(volume_level, tmp_path / f"in-{index}.dcm", uid, index + 1)
        report = same_result(reusing, full, src, tmp_path)
        assert report.outcome is Outcome.PASSED
        assert dcmread(tmp_path / "reused.dcm").InstanceNumber == 7
    assert reusing.memo.hits == 0


def test_explain_and_a_meta_naming_another_instance_take_a_full_run(
    tmp_path: Path, key: SecretKey, volume_level: Dataset
) -> None:
    reusing, full = engines(key)
    assert reusing.memo is not None
    write_instance(volume_level, tmp_path / "a.dcm", "2.25.2234567890123456789012345678901", 1)
    same_result(reusing, full, tmp_path / "a.dcm", tmp_path)
    src = write_instance(volume_level, tmp_path / "b.dcm", "2.25.2234567890123456789012345678902", 2)
    explained = reusing.deidentify_file(src, tmp_path / "explained.dcm", explain=True)
    assert explained.explain and reusing.memo.hits == 0
    lying = copy.deepcopy(volume_level)
    lying.SOPInstanceUID = "2.25.2234567890123456789012345678903"
    lying.file_meta.MediaStorageSOPInstanceUID = "2.25.2234567890123456789012345678904"
    lying.InstanceNumber = 3
    lying.save_as(tmp_path / "c.dcm", enforce_file_format=False)
    report = same_result(reusing, full, tmp_path / "c.dcm", tmp_path)
    assert report.outcome is Outcome.QUARANTINED
    assert reusing.memo.hits == 0


def test_reports_of_reused_headers_are_their_own(
    tmp_path: Path, key: SecretKey, volume_level: Dataset
) -> None:
    reusing, _ = engines(key)
    reports = []
    for index in range(3):
        uid = f"2.25.{3 * 10**31 + index}"
        src = write_instance(volume_level, tmp_path / f"in-{index}.dcm", uid, index + 1)
        reports.append(reusing.deidentify_file(src, tmp_path / f"out-{index}.dcm"))
    reports[1].uid_map.clear()
    reports[1].action_counts.clear()
    assert reports[2].uid_map and reports[2].action_counts
    assert len({r.new_sop_instance_uid for r in reports}) == 3


def test_the_memo_keeps_within_its_byte_budget(
    tmp_path: Path, key: SecretKey, volume_level: Dataset
) -> None:
    reusing, full = engines(key)
    reusing.memo = HeaderMemo(max_bytes=1024)  # a quarter of it holds no header
    for index in range(3):
        src = write_instance(volume_level, tmp_path / f"in-{index}.dcm", f"2.25.{5 * 10**31 + index}", 1)
        same_result(reusing, full, src, tmp_path)
    assert (reusing.memo.hits, reusing.memo.held_bytes) == (0, 0)
    reusing.memo = memo = HeaderMemo()
    same_result(reusing, full, tmp_path / "in-0.dcm", tmp_path)
    one = memo.held_bytes
    assert one > 0
    reusing.memo = memo = HeaderMemo(max_bytes=4 * one + 1)
    for index in range(6):  # six series, room for four headers
        changed = copy.deepcopy(volume_level)
        changed.ContentTime = f"1010{index:02d}"
        src = write_instance(changed, tmp_path / f"series-{index}.dcm", f"2.25.{6 * 10**31 + index}", 1)
        same_result(reusing, full, src, tmp_path)
        assert memo.held_bytes <= memo.max_bytes
    assert (memo.held_bytes, memo.hits) == (4 * one, 0)
    for index, hits in ((5, 1), (0, 1)):  # the last series is kept, the first was evicted
        changed = copy.deepcopy(volume_level)
        changed.ContentTime = f"1010{index:02d}"
        src = write_instance(changed, tmp_path / f"next-{index}.dcm", f"2.25.{7 * 10**31 + index}", 2)
        same_result(reusing, full, src, tmp_path)
        assert memo.hits == hits

"""Keyed replacements: UIDs, date offsets and pseudonyms."""

from __future__ import annotations

import re
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.deid import SecretKey, generate_key_file, load_key
from gateway.deid.dates import DateShifter
from gateway.deid.keys import KeyLoadError
from gateway.deid.pseudonyms import PatientLookup, PatientLookupError, Pseudonymizer
from gateway.deid.uids import UIDRemapper

KEY = SecretKey(b"k" * 32)
OTHER = SecretKey(b"o" * 32)
UID_RE = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$")
uids = st.from_regex(r"\A[1-9]\d{0,5}(\.[1-9]\d{0,8}){2,8}\Z")


@given(uids)
def test_uid_replacement_is_valid_and_stable(uid: str) -> None:
    new = UIDRemapper(KEY).remap(uid)
    assert new != uid and new.startswith("2.25.")
    assert len(new) <= 64 and UID_RE.match(new)
    assert UIDRemapper(KEY).remap(uid) == new  # another process, same key
    assert UIDRemapper(OTHER).remap(uid) != new


@given(uids)
def test_uid_under_configured_root(uid: str) -> None:
    new = UIDRemapper(KEY, "1.2.826.0.1.3680043.10.999").remap(uid)
    assert new.startswith("1.2.826.0.1.3680043.10.999.")
    assert len(new) <= 64 and UID_RE.match(new)


def test_well_known_uids_are_kept() -> None:
    remap = UIDRemapper(KEY).remap
    for uid in ("1.2.840.10008.5.1.4.1.1.77.1.6", "1.2.840.10008.1.2.4.50", "1.2.840.10008.2.16.4"):
        assert remap(uid) == uid


def test_uuid_derived_uid_is_a_version_8_uuid() -> None:
    value = int(UIDRemapper(KEY).remap("1.2.3.4").split(".")[2])
    assert (value >> 76) & 0xF == 8  # version nibble
    assert (value >> 62) & 0x3 == 0b10  # RFC 9562 variant


@given(st.text(min_size=1, max_size=30))
def test_date_offset_is_never_zero_and_in_range(patient: str) -> None:
    shifter = DateShifter(KEY, -10, 10)
    days = shifter.offset_days(patient)
    assert days != 0 and -10 <= days <= 10
    assert shifter.offset_days(patient) == days


@given(st.dates(min_value=date(1900, 1, 1), max_value=date(2090, 1, 1)),
       st.dates(min_value=date(1900, 1, 1), max_value=date(2090, 1, 1)),
       st.integers(min_value=-3650, max_value=3650).filter(bool))  # fmt: skip
def test_shift_keeps_intervals(a: date, b: date, days: int) -> None:
    sa = DateShifter.shift_da(a.strftime("%Y%m%d"), days)
    sb = DateShifter.shift_da(b.strftime("%Y%m%d"), days)
    assert sa is not None and sb is not None
    parse = lambda s: date(int(s[:4]), int(s[4:6]), int(s[6:]))  # noqa: E731
    assert parse(sb) - parse(sa) == b - a
    assert parse(sa) - a == timedelta(days=days)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240314101530.123456+0100", "20240310101530.123456+0100"),
        ("20240314", "20240310"),
        ("202403", "202402"),  # month precision kept, shifted from the 1st
        ("2024", "2023"),
        ("20240314-0500", "20240310-0500"),
    ],
)
def test_shift_datetime_keeps_time_and_offset(value: str, expected: str) -> None:
    assert DateShifter.shift_dt(value, -4) == expected


@pytest.mark.parametrize("value", ["", "2024131", "20241340", "yesterday", "20240314T10"])
def test_invalid_dates_are_not_shifted(value: str) -> None:
    assert DateShifter.shift_da(value, 3) is None or DateShifter.shift_dt(value, 3) is None


def test_pseudonyms_are_keyed_and_share_a_namespace() -> None:
    p = Pseudonymizer(KEY)
    assert p.patient("MRN1", "") == p.patient("MRN1", "")
    assert p.patient("MRN1", "") != p.patient("MRN1", "HOSP-B")
    assert p.patient("MRN1", "") != Pseudonymizer(OTHER).patient("MRN1", "")
    assert p.slide("S-1")[6:] == p.specimen("S-1")[9:]  # same identifier, same code


def test_lookup_table_takes_precedence(tmp_path: Path) -> None:
    table = tmp_path / "lookup.csv"
    table.write_text("original_id,research_id,issuer\nMRN1,SUBJ-001,\nMRN2,SUBJ-002,HOSP\n")
    p = Pseudonymizer(KEY, PatientLookup.from_csv(table))
    assert p.patient("MRN1", "ANY") == "SUBJ-001"
    assert p.patient("MRN2", "HOSP") == "SUBJ-002"
    assert p.patient("MRN3", "") is None
    bad = tmp_path / "bad.csv"
    bad.write_text("id,research\nx,y\n")
    with pytest.raises(PatientLookupError, match="missing column"):
        PatientLookup.from_csv(bad)


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "gateway.key"
    key = generate_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(path).fingerprint == key.fingerprint
    assert "key" not in repr(key).lower().replace("secretkey", "")  # no material shown
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    with pytest.raises(KeyLoadError, match="no key"):
        load_key(None, environ={})
    with pytest.raises(KeyLoadError, match="at least 32 bytes"):
        load_key(None, environ={"DEID_GATEWAY_KEY": "abcd"})
    assert load_key(None, environ={"DEID_GATEWAY_KEY": "ab" * 32}).fingerprint

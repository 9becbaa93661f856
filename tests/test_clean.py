"""The Clean action for free text."""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from gateway.deid.clean import REDACTED, TextCleaner
from gateway.deid.harvest import harvest
from gateway.deid.profile import load_profile


def _cleaner(**values: str) -> TextCleaner:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return TextCleaner(harvest(ds), load_profile("research").clean_patterns)


def test_removes_names_components_ids_and_written_dates() -> None:
    cleaner = _cleaner(
        PatientName="Vandermeer^Josefina^Alma",
        PatientID="QX77AB",
        AccessionNumber="ACC4431",
        ContainerIdentifier="BC-2231-K",
        PatientBirthDate="19600314",
    )
    text = "Biopsy of Josefina Vandermeer (QX77AB, ACC4431) slide BC-2231-K born 14 Mar 1960"
    cleaned = cleaner.clean(text)
    assert cleaned is not None
    for value in ("Josefina", "Vandermeer", "QX77AB", "ACC4431", "BC-2231-K", "1960"):
        assert value.lower() not in cleaned.lower()
    assert cleaned.startswith("Biopsy of")
    assert REDACTED in cleaned


def test_profile_patterns_remove_other_dates_and_numbers() -> None:
    cleaned = _cleaner().clean("Frozen section 03/04/2021, case 12345678, mail a.b@c.org")
    assert cleaned is not None
    assert not re.search(r"\d{4}|@", cleaned)


def test_unknown_words_are_removed_known_kept() -> None:
    cleaned = _cleaner().clean("Hematoxylin and eosin stained section of breast, Zorblax")
    assert cleaned == f"Hematoxylin and eosin stained section of breast, {REDACTED}"


def test_nothing_known_left_means_not_cleanable() -> None:
    assert _cleaner().clean("Zorblax Quintavalle") is None
    assert _cleaner().clean("12") == "12"

"""Profiles: built-ins load, extends/overrides work, bad files fail with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.deid import ProfileError, load_profile
from gateway.deid.standard import OPTION_COLUMNS, confidentiality_table, safe_private_attributes


def test_tables_load_from_the_copied_standard() -> None:
    table = confidentiality_table()
    assert len(table.rows) == 657
    assert len({r.tag_text for r in table.rows}) == 657
    assert table.lookup(0x00100010).name == "Patient's Name"
    assert table.lookup(0x60023000).name == "Overlay Data"  # repeating group 60xx
    assert table.lookup(0x50100010).name == "Curve Data"  # repeating group 50xx
    assert table.lookup(0x60013000) is None  # odd group: private, not an overlay
    assert len(safe_private_attributes()) == 479


def test_builtin_profiles() -> None:
    basic = load_profile("basic")
    research = load_profile("research")
    assert basic.options == frozenset()
    assert research.options == {
        "retain_long_modified_dates", "retain_patient_characteristics", "clean_descriptors",
        "clean_structured_content", "clean_graphics", "retain_safe_private",
    }  # fmt: skip
    assert research.dates_mode == "modified"
    assert basic.content_hash != research.content_hash
    assert research.rules[0x00100020].action == "pseudonym"  # inherited from basic


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_user_profile_extends_and_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
name: project-x
extends: research
options: [retain_device_identity]
private:
  keep_creators: [ACME 1.0]
settings:
  uid_root: "1.2.826.0.1.3680043.10.999"
  date_shift_days: [-30, -1]
rules:
  - attribute: StudyDescription
    action: replace
    value: Project X
    why: the archive groups studies by this text
  - attribute: "(0009,xx10)"
    creator: ACME 1.0
    action: X
    why: this element holds the operator's badge number
  - attribute: "(0008,1030)"
    action: hash
    why: overrides the rule above by tag
""",
    )
    profile = load_profile(path)
    assert profile.name == "project-x"
    assert "retain_device_identity" in profile.options and "clean_descriptors" in profile.options
    assert profile.rules[0x00081030].action == "hash"
    assert profile.rules[("ACME 1.0", 0x0009, 0x10)].action == "X"
    assert profile.keep_private_creators == {"ACME 1.0"}
    assert profile.uid_root == "1.2.826.0.1.3680043.10.999"
    assert profile.date_shift_days == (-30, -1)
    assert str(path) in profile.rules[0x00081030].source


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("rules:\n  - attribute: PatientNam\n    action: X\n    why: w\n", 2, "unknown attribute keyword"),
        ("rules:\n  - attribute: PatientName\n    action: Q\n    why: w\n", 2, "unknown action"),
        ("rules:\n  - attribute: (0010,00ZZ)\n    action: X\n    why: w\n", 2, "unknown attribute keyword"),
        ("rules:\n  - attribute: PatientName\n    action: X\n", 2, "needs 'why'"),
        ("rules:\n  - attribute: (0009,1010)\n    action: X\n    why: w\n", 2, "private tag"),
        ("options: [retain_everything]\n", 1, "unknown option"),
        ("name: x\nsettings:\n  overview: keep\n", 3, "overview_keep_acknowledged"),
        ("name: x\nsettings:\n  date_shift_days: [0, 0]\n", 3, "date_shift_days"),
        ("name: x\ncolour: blue\n", 2, "unknown key"),
        ("rules:\n  - attribute: StudyDescription\n    action: replace\n    why: w\n", 2, "needs 'value'"),
        ("rules: [\n", 2, "not valid YAML"),
    ],
)
def test_bad_profiles_fail_with_file_line_and_reason(
    tmp_path: Path, body: str, line: int, message: str
) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line}:"), text
    assert message in text


def test_full_and_modified_dates_exclude_each_other(tmp_path: Path) -> None:
    path = _write(tmp_path, "extends: research\noptions: [retain_long_full_dates]\n")
    with pytest.raises(ProfileError, match="cannot be used together"):
        load_profile(path)


def test_extends_cycle_and_missing_parent(tmp_path: Path) -> None:
    _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ProfileError, match="cycle"):
        load_profile(tmp_path / "a.yaml")
    with pytest.raises(ProfileError, match="not found"):
        load_profile(_write(tmp_path, "extends: nowhere\n", "c.yaml"))


def test_every_option_is_a_switch(tmp_path: Path) -> None:
    for option in OPTION_COLUMNS:
        if option == "retain_long_full_dates":
            continue
        path = _write(tmp_path, f"extends: basic\noptions: [{option}]\n", f"{option}.yaml")
        assert load_profile(path).options == {option}

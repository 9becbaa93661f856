"""The documents say what the code does: regenerated parts match, listed values are the code's."""

from __future__ import annotations

from pathlib import Path

from gateway.cli import main
from gateway.commands.profile_doc import render
from gateway.deid import load_profile
from gateway.deid.profile import builtin_profiles

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_profile_reference_is_regenerated_from_the_profiles() -> None:
    expected = render([load_profile(name) for name in sorted(builtin_profiles())])
    committed = (DOCS / "profile-reference.md").read_text(encoding="utf-8")
    assert committed == expected, (
        "docs/profile-reference.md is stale: run "
        "`deid-gateway profile-doc --output docs/profile-reference.md`"
    )


def test_profile_doc_command_writes_one_profile(tmp_path: Path) -> None:
    output = tmp_path / "basic.md"
    assert main(["profile-doc", "--profile", "basic", "--output", str(output)]) == 0
    text = output.read_text(encoding="utf-8")
    assert "### basic" in text and "### research" not in text
    assert "| (0008,0050) | Accession Number | `Z` | `Z` Basic Profile |" in text
    assert main(["profile-doc", "--profile", str(tmp_path / "missing.yaml")]) == 2

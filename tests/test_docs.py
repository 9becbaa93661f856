"""The documents say what the code does: regenerated parts match, listed values are the code's."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, build_context

from gateway.cli import main
from gateway.commands.profile_doc import render
from gateway.config import PASS_THROUGH_TRANSFER_SYNTAXES, PATHOLOGY_SOP_CLASSES, load_config
from gateway.deid import load_profile
from gateway.deid.profile import builtin_profiles
from gateway.synthetic import SyntheticStudy
from tests.peers import DCMTK_ENV, ECHOSCU, STORESCU, Gateway

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


# ------------------------------------------------------- conformance statement

CONFORMANCE = DOCS / "conformance-statement.md"
VERIFICATION = "1.2.840.10008.1.1"
UID_IN_CELL = re.compile(r"`(1\.2\.840\.10008[0-9.]*)`")
#: Outside the defaults: CT Image Storage, and Explicit VR Big Endian.
NOT_ACCEPTED_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
NOT_ACCEPTED_SYNTAX = "1.2.840.10008.1.2.2"
EXPLICIT_LE, JPEG_BASELINE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"


def section_uids(heading: str) -> list[str]:
    """The UIDs in the table of one section of the conformance statement, in order."""
    text = CONFORMANCE.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    end = text.index("\n#", start + 1)
    return UID_IN_CELL.findall(text[start:end])


def test_conformance_statement_lists_exactly_the_default_classes_and_syntaxes() -> None:
    sop_classes = section_uids("### 2.1 SOP Classes")
    assert sop_classes == [VERIFICATION, *PATHOLOGY_SOP_CLASSES]
    assert section_uids("### 2.2 Transfer Syntaxes") == list(PASS_THROUGH_TRANSFER_SYNTAXES)
    assert load_config(None).sop_classes == PATHOLOGY_SOP_CLASSES
    assert load_config(None).transfer_syntaxes == PASS_THROUGH_TRANSFER_SYNTAXES


@pytest.fixture(scope="module")
def running_gateway(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[Gateway]:
    """``deid-gateway serve`` on its default SOP Classes and Transfer Syntaxes."""
    config = {
        "allowed_callers": [{"ae_title": "*", "hosts": ["127.0.0.1"]}],
        "spool_dir": "spool",
        "key_file": str(key_file),
        "profile": "research",
        "destinations": [{"name": "archive", "folder": "archive"}],
    }
    gateway = Gateway(tmp_path_factory.mktemp("conformance"), config).start()
    try:
        yield gateway
    finally:
        gateway.stop()


def negotiate(port: int, pairs: list[tuple[str, list[str]]]) -> list[tuple[str, str | None]]:
    """Propose one context per (SOP Class, syntaxes); return (abstract syntax,
    accepted syntax or None) per context, in the order proposed."""
    results: list[tuple[str, str | None]] = []
    for start in range(0, len(pairs), 128):
        ae = AE(ae_title="CONFORMANCE")
        ae.acse_timeout = 10
        contexts = [build_context(sop, syntaxes) for sop, syntaxes in pairs[start : start + 128]]
        assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title="DEID_GATEWAY")
        assert assoc.is_established
        by_id = {cx.context_id: cx for cx in assoc.accepted_contexts + assoc.rejected_contexts}
        for cx in sorted(by_id.values(), key=lambda c: c.context_id):
            accepted = cx.result == 0x00
            results.append((str(cx.abstract_syntax), str(cx.transfer_syntax[0]) if accepted else None))
        assoc.release()
    return results


@pytest.mark.integration
def test_gateway_negotiates_what_the_statement_lists(running_gateway: Gateway) -> None:
    sop_classes = [*section_uids("### 2.1 SOP Classes")[1:], NOT_ACCEPTED_SOP_CLASS]
    syntaxes = [*section_uids("### 2.2 Transfer Syntaxes"), NOT_ACCEPTED_SYNTAX]
    pairs = [(sop, [ts]) for sop in sop_classes for ts in syntaxes]
    accepted = {(sop, ts) for sop, ts in negotiate(running_gateway.port, pairs) if ts is not None}
    documented = {(sop, ts) for sop in section_uids("### 2.1 SOP Classes")[1:]
                  for ts in section_uids("### 2.2 Transfer Syntaxes")}  # fmt: skip
    assert accepted == documented
    # Several syntaxes in one context: the first in the statement's order wins.
    both = negotiate(running_gateway.port, [(sop_classes[0], [JPEG_BASELINE, EXPLICIT_LE])])
    assert both == [(sop_classes[0], EXPLICIT_LE)]
    verification = negotiate(running_gateway.port, [(VERIFICATION, [ts]) for ts in DEFAULT_TRANSFER_SYNTAXES])
    assert all(ts is not None for _, ts in verification)


def storescu_profile(directory: Path, contexts: list[tuple[str, str]]) -> Path:
    """A dcmtk storescu configuration proposing exactly ``contexts``, one syntax each."""
    syntaxes = sorted({ts for _, ts in contexts})
    lines = ["[[TransferSyntaxes]]"]
    for index, ts in enumerate(syntaxes):
        lines += [f"[TS{index}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for index, (sop, ts) in enumerate(contexts, start=1):
        lines.append(f"PresentationContext{index} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Conformance]", "PresentationContexts = Contexts"]
    path = directory / "storescu.cfg"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.integration
def test_dcmtk_storescu_and_echoscu_agree(
    running_gateway: Gateway, tmp_path: Path, synthetic_study: SyntheticStudy
) -> None:
    """dcmtk proposes each class with Explicit VR Little Endian and the WSI class
    with each syntax; contexts are accepted exactly as the statement says."""
    documented_classes = section_uids("### 2.1 SOP Classes")[1:]
    documented_syntaxes = section_uids("### 2.2 Transfer Syntaxes")
    wsi = documented_classes[0]
    contexts = [(sop, EXPLICIT_LE) for sop in [*documented_classes, NOT_ACCEPTED_SOP_CLASS]]
    contexts += [(wsi, ts) for ts in [*documented_syntaxes, NOT_ACCEPTED_SYNTAX]]
    config = storescu_profile(tmp_path, contexts)
    result = subprocess.run(
        [STORESCU, "-d", "-xf", str(config), "Conformance", "-aec", "DEID_GATEWAY",
         "127.0.0.1", str(running_gateway.port), str(synthetic_study.sr)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = re.findall(r"Context ID:\s+(\d+) \(([^)]*)\)", result.stdout + result.stderr)
    answered = {int(cid): verdict for cid, verdict in verdicts if verdict != "Proposed"}
    assert sorted(answered) == list(range(1, 2 * len(contexts), 2))
    for index, (sop, ts) in enumerate(contexts):
        expected = sop in documented_classes and ts in documented_syntaxes
        assert (answered[2 * index + 1] == "Accepted") is expected, (sop, ts, answered[2 * index + 1])
    echo = subprocess.run(
        [ECHOSCU, "-d", "-aec", "DEID_GATEWAY", "127.0.0.1", str(running_gateway.port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert echo.returncode == 0
    assert re.search(r"Context ID:\s+1 \(Accepted\)", echo.stdout + echo.stderr)

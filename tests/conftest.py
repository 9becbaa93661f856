"""Shared fixtures: a fixed test key and one synthetic study built once per test run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.deid import SecretKey
from gateway.synthetic import PlantedPHI, SyntheticStudy, write_study
from tests.peers import Storescp

#: Seed of the synthetic patient shared by the de-identification tests.
STUDY_SEED = 23
#: A fixed key, so that failures reproduce; never used outside tests.
TEST_KEY_MATERIAL = bytes(range(32))


@pytest.fixture(scope="session")
def key() -> SecretKey:
    """The secret key of the de-identification tests."""
    return SecretKey(TEST_KEY_MATERIAL)


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same key as :func:`key`, as a hex key file for the command line."""
    path = tmp_path_factory.mktemp("key") / "gateway.key"
    path.write_text(TEST_KEY_MATERIAL.hex() + "\n", encoding="ascii")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def synthetic_phi() -> PlantedPHI:
    """The planted values of the shared synthetic study's patient."""
    return PlantedPHI.create(STUDY_SEED)


@pytest.fixture(scope="session")
def synthetic_study(tmp_path_factory: pytest.TempPathFactory, synthetic_phi: PlantedPHI) -> SyntheticStudy:
    """Two slides (the first with a concatenated level, a TILED_SPARSE level and a
    thumbnail), label and overview images, an SR and three Secondary Captures.

    Built once per run; tests must treat its folder as read-only.
    """
    return write_study(tmp_path_factory.mktemp("synthetic-study"), synthetic_phi, slides=2)


@pytest.fixture(scope="session")
def planted_tokens(synthetic_study: SyntheticStudy, synthetic_phi: PlantedPHI) -> list[str]:
    """Every planted value of the shared study, UIDs included (listed after writing)."""
    return synthetic_phi.all_tokens()


@pytest.fixture(scope="session")
def volume_level(synthetic_study: SyntheticStudy) -> Dataset:
    """A VOLUME level of the shared study's second slide, with its pixel data.

    Shared: copy it (``copy.deepcopy``; ``Dataset.copy()`` shares the
    elements) before changing anything.
    """
    for path in synthetic_study.slides[1]:
        ds = dcmread(path)
        if "VOLUME" in ds.ImageType and "PixelData" in ds:
            return ds
    raise AssertionError("the synthetic slide has no VOLUME level")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Storescp]:
    """dcmtk's storescp as a research archive, stopped after the test."""
    peer = Storescp(tmp_path / "archive").start()
    try:
        yield peer
    finally:
        peer.stop()

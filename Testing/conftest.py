"""Shared fixtures: paths of the repository, the bundled sample and the shipped weights."""
from pathlib import Path

import pytest

from testdata import SAMPLE, SHARED_DATA, WEIGHTS_2D


@pytest.fixture(scope="session")
def sample_slice() -> Path:
    return SAMPLE / "ecog_slice_t1.nii.gz"


@pytest.fixture(scope="session")
def sample_labels() -> Path:
    return SAMPLE / "ecog_slice_seg4.nii.gz"


@pytest.fixture(scope="session")
def weights_2d() -> Path:
    if not WEIGHTS_2D.exists():
        pytest.skip("shipped 2D weights not built yet (Resources/Weights/metaseg2d.pt)")
    return WEIGHTS_2D


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real data (../shared/data/brains); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/brains not present")
    return SHARED_DATA

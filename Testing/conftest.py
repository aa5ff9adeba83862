"""Shared fixtures: paths of the repository, the bundled sample and the shipped weights."""
from pathlib import Path

import pytest

import math

import torch

from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitPlan
from metaseg.method.model import MetaSegNet
from metaseg.method.weights import LABELS, Weights, save_weights
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


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Untrained weights of the real format: fast, for the tests about files and errors."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=16, hidden_layers=1)
    net = MetaSegNet(cfg)
    card = {"labels": LABELS, "fit": FitPlan(steps=2, batch_size=512).to_dict(), "input": {"dims": 2, "canvas": [192, 192]}}
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(Weights(cfg, net.state_dict(), torch.full((2, len(net.inr_parameter_names())), math.log(1e-3)), card), path)
    return path

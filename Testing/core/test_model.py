import math

import pytest
import torch

from metaseg.method.config import PAPER_2D, PAPER_3D, ModelConfig
from metaseg.method.model import MetaSegNet, parameter_count


@pytest.mark.parametrize("config,params", [(PAPER_2D, 83_718), (PAPER_3D, 331_526)])
def test_paper_configurations_have_the_papers_size(config, params):
    # paper: 83K parameters (2D) and 330K (3D)
    assert parameter_count(MetaSegNet(config)) == params


def test_shapes_of_intensity_features_and_logits():
    net = MetaSegNet(PAPER_2D)
    x = torch.rand(17, 2) * 2 - 1
    inten, feats = net(x)
    assert inten.shape == (17,)
    assert feats.shape == (17, 128)
    assert net.head(feats).shape == (17, 5)
    assert all(-1.0 <= v <= 1.0 for v in (feats.min().item(), feats.max().item()))  # sine features


@pytest.mark.parametrize("all_layers", [False, True])
def test_the_fit_s_forward_gives_the_same_intensity_without_gathering_features(all_layers):
    net = MetaSegNet(ModelConfig(width=32, hidden_layers=3, head_all_layers=all_layers))
    x = torch.rand(33, 2) * 2 - 1
    inten, feats = net(x)
    alone, none = net(x, features=False)  # what a test-time fit runs (metaseg.method.fit.adapt)
    assert none is None and torch.equal(alone, inten)
    assert feats.shape == (33, 32 * (4 if all_layers else 1))


def test_siren_initialization_ranges():
    torch.manual_seed(0)
    net = MetaSegNet(ModelConfig(width=64, hidden_layers=3))
    first = net.trunk[0].linear.weight
    assert first.abs().max() <= 1.0 / 2 and first.abs().max() > 0.4  # U(-1/in, 1/in), in = 2
    bound = math.sqrt(6 / 64) / 30
    for layer in list(net.trunk)[1:]:
        w = layer.linear.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_inr_parameters_exclude_the_head():
    names = MetaSegNet(PAPER_2D).inr_parameter_names()
    assert names and not any(n.startswith("head.") for n in names)
    assert "intensity.weight" in names and "trunk.0.linear.weight" in names


def test_config_round_trip_and_unknown_keys():
    assert ModelConfig.from_dict(PAPER_3D.to_dict()) == PAPER_3D
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**PAPER_2D.to_dict(), "depth": 3})

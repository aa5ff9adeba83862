"""The spatial prior (metaseg.method.prior), a head that reads it, and fits decoded from averaged parameters."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitPlan, adapt, fit
from metaseg.labelsets import label_set
from metaseg.train.legacy import STAGE1_FORMAT
from metaseg.train.meta_train import load_init
from metaseg.method.model import MetaSegNet
from metaseg.method.preprocess import grid_coords
from metaseg.method.prior import SpatialPrior, class_fractions, coarse_shape
from metaseg.io.safefile import dumps_tree
from metaseg.method.weights import Weights, WeightsError, load_weights, save_weights, weights_problem
from testdata import SAMPLE

STRUCTURES = label_set("structures")


@pytest.fixture(scope="module")
def sample_classes():
    """The bundled sample's 31 structures as class indices, a 64^3 block around the hippocampi (real labels)."""
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "ecog_structures.nii.gz")))
    lut = np.asarray(STRUCTURES.index_lut(), np.int16)
    classes = lut[lab]
    assert (classes >= 0).all()
    hip = np.argwhere(classes == STRUCTURES.values.index(17))
    c = hip.mean(0).astype(int)
    box = tuple(slice(max(0, x - 32), max(0, x - 32) + 64) for x in c)
    return classes[box]


def test_class_fractions_are_smoothed_one_hot_maps_on_the_coarse_grid(sample_classes):
    f = class_fractions(sample_classes, len(STRUCTURES))
    assert f.shape == (len(STRUCTURES),) + coarse_shape(sample_classes.shape) == (32, 16, 16, 16)
    inner = f[:, 4:-4, 4:-4, 4:-4].sum(0)  # away from the block's edge (zero outside it) the classes sum to 1
    assert torch.allclose(inner, torch.ones_like(inner), atol=1e-4)
    hippo = STRUCTURES.values.index(17)
    peak = np.unravel_index(int(f[hippo].argmax()), f.shape[1:])
    assert sample_classes[tuple(4 * p for p in peak)] == hippo  # coarse voxel k sits on fine voxel 4k


def test_the_prior_reads_its_grid_at_model_coordinates_and_leaves_one_brain_out(sample_classes):
    a, b = sample_classes, np.flip(sample_classes, 2).copy()  # two "brains": the block and its mirror image
    n = len(STRUCTURES)
    both = SpatialPrior.build([a, b], n)
    only_b = SpatialPrior.build([b], n)
    assert torch.allclose(both.without(class_fractions(a, n), 2).probs, only_b.probs, atol=1e-5)
    coords = grid_coords(both.probs.shape[1:])  # the coarse grid's own points
    assert torch.allclose(both.at(coords), both.probs.reshape(n, -1).T, atol=1e-5)
    stored = both.to_uint8()
    assert stored.dtype == torch.uint8
    assert (SpatialPrior.from_uint8(stored).probs - both.probs.clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6


def _prior_net(n_classes=4, canvas=(16, 12, 10)):
    cfg = ModelConfig(in_dim=3, width=16, hidden_layers=1, n_classes=n_classes, head_intensity=True, head_prior=True)
    torch.manual_seed(0)
    net = MetaSegNet(cfg)
    probs = torch.rand((n_classes,) + coarse_shape(canvas))
    return net, SpatialPrior(probs / probs.sum(0, keepdim=True)), canvas


def test_a_prior_head_reads_the_prior_at_each_point_and_says_when_it_has_none():
    net, prior, canvas = _prior_net()
    assert net.head_in_features == 16 + 1 + 4  # penultimate features, intensity, 4 class probabilities
    x = grid_coords(canvas)[:50]
    feats, pixels = net.features(x), torch.rand(50)
    with pytest.raises(ValueError, match="reads a spatial prior"):
        net.head_input(feats, pixels, x)
    net.prior = prior
    got = net.head_input(feats, pixels, x)
    assert torch.allclose(got[:, -4:], prior.at(x))
    other = SpatialPrior(torch.zeros_like(prior.probs))
    assert torch.equal(net.head_input(feats, pixels, x, other)[:, -4:], torch.zeros(50, 4))  # training's own prior


def test_init_from_a_head_without_the_prior_starts_as_that_head(tmp_path):
    net, prior, canvas = _prior_net()
    old = MetaSegNet(ModelConfig(in_dim=3, width=16, hidden_layers=1, n_classes=4, head_intensity=True))
    log_lr = torch.zeros(2, len(old.inr_parameter_names()))
    stage1 = tmp_path / "best_stage1.safetensors"
    stage1.write_bytes(dumps_tree({"net": old.state_dict(), "log_lr": log_lr}, STAGE1_FORMAT))
    load_init(net, torch.zeros_like(log_lr), stage1)
    net.prior = prior
    x, pixels = grid_coords(canvas)[:100], torch.rand(100)
    with torch.no_grad():
        assert torch.allclose(net.head(net.head_input(net.features(x), pixels, x)),
                              old.head(old.head_input(old.features(x), pixels)), atol=1e-6)


def test_weights_carry_the_prior_and_refuse_a_missing_one(tmp_path):
    net, prior, canvas = _prior_net()
    card = {"labels": [{"value": i, "name": f"c{i}", "color": [i, i, i]} for i in range(4)],
            "fit": FitPlan(steps=2, batch_size=64, average_last=1).to_dict(), "input": {"dims": 3, "canvas": list(canvas)}}
    w = Weights(net.config, net.state_dict(), torch.zeros(2, len(net.inr_parameter_names())), card, prior=prior.to_uint8())
    save_weights(w, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(back.prior, prior.to_uint8())
    assert back.plan.average_last == 1
    built = back.build()
    assert torch.allclose(built.prior.probs, SpatialPrior.from_uint8(prior.to_uint8()).probs)
    w.prior = None
    assert "spatial prior" in weights_problem(w)
    save_weights(w, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="spatial prior"):
        load_weights(tmp_path / "bad.safetensors")


def test_a_fit_averaged_over_its_last_steps_decodes_the_mean_parameters():
    net = MetaSegNet(ModelConfig(in_dim=3, width=16, hidden_layers=1))
    coords = grid_coords((12, 12, 12))
    values = torch.rand(coords.shape[0])
    log_lr = torch.full((1, len(net.inr_parameter_names())), -7.0)
    params = {k: p.detach() for k, p in net.named_parameters()}
    plan = FitPlan(steps=6, batch_size=256, average_last=3)
    got = fit(net, params, coords, values, plan, log_lr, seed=3).params
    steps = [{k: t.clone() for k, t in fast.items()} for _, _, fast in
             adapt(net, params, coords, values, plan, log_lr, generator=torch.Generator().manual_seed(3))]
    for k in got:
        assert torch.allclose(got[k], sum(s[k] for s in steps[3:]) / 3, atol=1e-6)
    last = fit(net, params, coords, values, FitPlan(steps=6, batch_size=256), log_lr, seed=3).params
    assert any(not torch.allclose(got[k], last[k]) for k in got if not k.startswith("head."))


def test_a_prior_power_weighs_the_heads_probabilities_by_the_prior():
    cfg = ModelConfig(in_dim=3, width=16, hidden_layers=1, n_classes=4, prior_power=0.5)
    assert cfg.uses_prior and ModelConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    net = MetaSegNet(cfg)
    canvas = (16, 12, 10)
    x = grid_coords(canvas)[:200]
    logits = net.head(net.features(x))
    with pytest.raises(ValueError, match="carry none"):
        net.with_prior(logits, x)
    probs = torch.rand((4,) + coarse_shape(canvas)) + 0.01
    net.prior = SpatialPrior(probs / probs.sum(0, keepdim=True))
    want = torch.softmax(logits, -1) * net.prior.at(x) ** 0.5
    got = torch.softmax(net.with_prior(logits, x), -1)
    assert torch.allclose(got, want / want.sum(1, keepdim=True), atol=1e-5)
    params = {k: p.detach() for k, p in net.named_parameters()}
    from metaseg.method.fit import FittedINR

    assert torch.allclose(FittedINR(net, params).probabilities(x), got.detach(), atol=1e-5)  # decoding applies it

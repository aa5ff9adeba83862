import math
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from metaseg.method.config import ModelConfig
from metaseg.method.fit import FitCancelled, FitPlan, FixedSchedule, adapt, fit
from metaseg.train.meta_train import load_init
from metaseg.method.model import MetaSegNet
from metaseg.method.preprocess import grid_coords, normalize_intensity, pad_to_canvas, sample_grid

SMALL = ModelConfig(width=32, hidden_layers=2)


@pytest.fixture(scope="module")
def sample_canvas(sample_slice):
    """The bundled real slice, normalized and padded to the 192x192 model canvas."""
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_slice)))[0]
    padded, _ = pad_to_canvas(normalize_intensity(arr), (192, 192))
    return grid_coords((192, 192)), torch.from_numpy(padded).reshape(-1)


def _log_lr(net, steps, lr=1e-3, requires_grad=False):
    dtype = next(net.parameters()).dtype
    return torch.full((steps, len(net.inr_parameter_names())), math.log(lr), dtype=dtype, requires_grad=requires_grad)


def test_inner_adam_matches_torch_adam():
    torch.manual_seed(0)
    net = MetaSegNet(SMALL)
    coords, values = torch.rand(64, 2) * 2 - 1, torch.rand(64)
    plan = FitPlan(steps=3, batch_size=10_000)  # full batch: deterministic
    *_, (_, _, ours) = adapt(net, {k: p.detach() for k, p in net.named_parameters()}, coords, values, plan, _log_lr(net, 3))
    ref = MetaSegNet(SMALL)
    ref.load_state_dict(net.state_dict())
    opt = torch.optim.Adam([p for n, p in ref.named_parameters() if not n.startswith("head.")], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        torch.mean((ref(coords)[0] - values) ** 2).backward()
        opt.step()
    for n, p in ref.named_parameters():
        assert torch.allclose(ours[n], p.detach(), atol=1e-6), n


def test_meta_gradient_flows_through_the_inner_adam_steps():
    torch.manual_seed(0)
    net = MetaSegNet(SMALL).double()  # float64 so that a finite difference can check the gradient
    coords, values = torch.rand(256, 2, dtype=torch.float64) * 2 - 1, torch.rand(256, dtype=torch.float64)
    plan = FitPlan(steps=2, batch_size=10_000)

    def meta_grad(**mode):
        net.zero_grad()
        log_lr = _log_lr(net, 2, requires_grad=True)
        *_, (_, _, fast) = adapt(net, dict(net.named_parameters()), coords, values, plan, log_lr, **mode)
        pred, feats = torch.func.functional_call(net, fast, (coords,))
        torch.mean((pred - values) ** 2).backward()
        return net.trunk[0].linear.weight.grad.clone(), log_lr.grad.clone()

    g2, glr = meta_grad(create_graph=True)
    g1, _ = meta_grad(first_order=True)
    assert torch.isfinite(g2).all() and g2.abs().sum() > 0
    assert glr.abs().sum() > 0  # the learning rates are meta-learned too
    # second-order terms exist: the gradient through the inner steps is not the first-order one
    assert not torch.allclose(g1, g2)
    # and it is right: compare with a finite difference of the whole inner loop
    w = net.trunk[0].linear.weight
    eps = 1e-6
    i = (0, 1)

    def outer_loss():
        with torch.no_grad():
            params = {k: p.detach() for k, p in net.named_parameters()}
        *_, (_, _, fast) = adapt(net, params, coords, values, plan, _log_lr(net, 2))
        with torch.no_grad():
            return torch.mean((torch.func.functional_call(net, fast, (coords,))[0] - values) ** 2).item()

    with torch.no_grad():
        w[i] += eps
    up = outer_loss()
    with torch.no_grad():
        w[i] -= 2 * eps
    down = outer_loss()
    with torch.no_grad():
        w[i] += eps
    fd = (up - down) / (2 * eps)
    assert fd == pytest.approx(float(g2[i]), rel=0.05, abs=1e-6)


def test_fit_lowers_the_mse_on_a_real_slice(sample_canvas):
    torch.manual_seed(0)
    coords, values = sample_canvas
    net = MetaSegNet(SMALL)
    params = {k: p.detach() for k, p in net.named_parameters()}
    losses = [float(loss) for _, loss, _ in adapt(net, params, coords, values, FitPlan(steps=60, batch_size=4096),
                                                  _log_lr(net, 60), generator=torch.Generator().manual_seed(0))]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_fit_reports_progress_and_is_reproducible(sample_canvas):
    coords, values = sample_canvas
    net = MetaSegNet(SMALL)
    params = {k: p.detach() for k, p in net.named_parameters()}
    seen = []
    a = fit(net, params, coords, values, FitPlan(steps=4, batch_size=1024), _log_lr(net, 4), seed=3, progress=seen.append)
    b = fit(net, params, coords, values, FitPlan(steps=4, batch_size=1024), _log_lr(net, 4), seed=3)
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert seen[-1].remaining_s == 0 and all(p.psnr > 0 and p.elapsed_s >= 0 for p in seen)
    assert torch.equal(a.labels(coords[:500]), b.labels(coords[:500]))


@pytest.mark.parametrize("name", ["metaseg2d.safetensors", "metaseg2d_structures.safetensors"])
def test_shipped_2d_weights_fit_every_pixel_so_the_seed_plays_no_part(name, sample_canvas):
    """The 2D fit's plan (in the card) takes the whole 192x192 canvas at every step (campaign/full_batch_fit.py):
    no random draw, so two seeds give the same network, and every pixel is fitted at every step."""
    from metaseg.method.weights import load_weights
    from testdata import WEIGHTS_2D

    w = load_weights(WEIGHTS_2D.parent / name)
    assert w.plan.batch_size >= math.prod(w.canvas) and w.plan.steps == 20
    coords, values = sample_canvas
    net = w.build()
    params = {k: p.detach() for k, p in net.named_parameters()}
    plan = FitPlan(steps=2, batch_size=w.plan.batch_size)  # two of its steps: enough to tell seeds apart
    a, b = (fit(net, params, coords, values, plan, w.log_lr, seed=seed, image=values.reshape(192, 192))
            for seed in (0, 7))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_a_fixed_schedule_visits_every_point_and_leaves_the_seed_out(sample_canvas):
    coords, values = sample_canvas
    brain = torch.nonzero(values > 0).squeeze(1)  # the slice's foreground, as a 3D fit sees its brain
    sched = FixedSchedule(brain, values.numel(), 512, share=brain.numel() / values.numel())
    seen = torch.zeros(brain.numel())
    steps = -(-values.numel() // sched.per_step)  # one pass over the canvas (the last step wraps around)
    for k in range(steps):
        seen[sched(k)] += 1
    assert seen.min() == 1 and seen.max() <= 2 and (seen == 2).sum() <= 1.25 * 512  # every point once per cycle
    assert all(abs(sched(k).numel() - 512) < 0.25 * 512 for k in range(steps - 1))
    # spread over the slice: each step's points reach every quarter of the rows
    rows = brain[sched(3)] // 192
    assert len(set((rows * 4 // 192).tolist())) >= 3
    other = FixedSchedule(brain, values.numel(), 512, share=brain.numel() / values.numel(), member=1)
    assert not torch.equal(other(0), sched(0))  # ensemble members start at other places

    net = MetaSegNet(SMALL)
    params = {k: p.detach() for k, p in net.named_parameters()}
    plan = FitPlan(steps=5, batch_size=512, schedule="fixed")
    a, b = (fit(net, params, coords[brain], values[brain], plan, _log_lr(net, 5), seed=seed, batches=sched)
            for seed in (0, 7))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)  # the seed plays no part
    with pytest.raises(ValueError, match="unknown fit schedule"):
        FitPlan(schedule="sometimes")
    assert "schedule" not in FitPlan().to_dict() and FitPlan(schedule="fixed").to_dict()["schedule"] == "fixed"


def test_cancel_stops_promptly_with_nothing_returned(sample_canvas):
    coords, values = sample_canvas
    net = MetaSegNet(SMALL)
    params = {k: p.detach() for k, p in net.named_parameters()}
    cancel = threading.Event()
    steps = []

    def progress(p):
        steps.append(p.step)
        if p.step == 2:
            cancel.set()

    with pytest.raises(FitCancelled, match="step 2 of 50"):
        fit(net, params, coords, values, FitPlan(steps=50, batch_size=1024), _log_lr(net, 50), progress=progress, cancel=cancel)
    assert steps == [1, 2]


def test_fitted_inr_queries_in_bounded_chunks(sample_canvas):
    coords, values = sample_canvas
    net = MetaSegNet(SMALL)
    params = {k: p.detach() for k, p in net.named_parameters()}
    inr = fit(net, params, coords, values, FitPlan(steps=1, batch_size=512), _log_lr(net, 1))
    inr.chunk = 1000  # many chunks, same answer
    pts = coords[:4321]
    probs = inr.probabilities(pts)
    assert probs.shape == (4321, 5) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(4321), atol=1e-5)
    assert torch.equal(inr.labels(pts), probs.argmax(-1).to(torch.uint8))
    labels, inten = inr.decode(pts)
    assert torch.equal(labels, inr.labels(pts)) and torch.allclose(inten, inr.intensity(pts))
    assert inr.features(pts).shape == (4321, 32)


def test_sample_grid_returns_the_pixels_on_the_grid(sample_canvas):
    coords, values = sample_canvas
    image = values.reshape(192, 192)
    idx = torch.randint(0, coords.shape[0], (5000,), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample_grid(image, coords[idx]), values[idx], atol=1e-5)
    vol = torch.rand(7, 9, 11, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sample_grid(vol, grid_coords(vol.shape)), vol.reshape(-1), atol=1e-5)
    assert torch.equal(sample_grid(vol, torch.tensor([[1.5, 0.0, 0.0]])), torch.zeros(1))  # outside: 0


def test_a_head_reading_intensities_gets_the_pixel_at_each_point(sample_canvas):
    coords, values = sample_canvas
    net = MetaSegNet(ModelConfig(width=32, hidden_layers=2, head_intensity=True))
    assert net.head[0].in_features == 33
    params = {k: p.detach() for k, p in net.named_parameters()}
    with pytest.raises(ValueError, match="reads the image's intensity"):
        fit(net, params, coords, values, FitPlan(steps=1, batch_size=512), _log_lr(net, 1))
    inr = fit(net, params, coords, values, FitPlan(steps=1, batch_size=512), _log_lr(net, 1), image=values.reshape(192, 192))
    pts = coords[:3000]
    with torch.no_grad():
        by_hand = net.head(torch.cat([inr.features(pts), values[:3000, None]], 1)).argmax(-1).to(torch.uint8)
    assert torch.equal(inr.labels(pts), by_hand)


def test_init_from_a_features_only_head_starts_as_that_head(tmp_path, sample_canvas):
    coords, _ = sample_canvas
    torch.manual_seed(0)
    old = MetaSegNet(SMALL)
    log_lr = _log_lr(old, 3)
    from metaseg.train.legacy import STAGE1_FORMAT
    from metaseg.io.safefile import dumps_tree

    (tmp_path / "best_stage1.safetensors").write_bytes(dumps_tree({"net": old.state_dict(), "log_lr": log_lr}, STAGE1_FORMAT))
    new = MetaSegNet(ModelConfig(width=32, hidden_layers=2, head_intensity=True, head_all_layers=True))
    assert new.head[0].in_features == 3 * 32 + 1
    new_lr = torch.zeros_like(log_lr)
    load_init(new, new_lr, tmp_path / "best_stage1.safetensors")
    assert torch.equal(new_lr, log_lr)
    with torch.no_grad():
        x, pixels = coords[:100], torch.rand(100)
        assert torch.allclose(new.head(new.head_input(new.features(x), pixels)), old.head(old.features(x)), atol=1e-6)
    with pytest.raises(SystemExit, match="does not fit this model"):
        load_init(MetaSegNet(ModelConfig(width=16, hidden_layers=2)), new_lr, tmp_path / "best_stage1.safetensors")
    with pytest.raises(SystemExit, match="no such file"):
        load_init(new, new_lr, tmp_path / "missing.safetensors")
    torch.save({"net": old.state_dict(), "log_lr": log_lr}, tmp_path / "best_stage1.pt")  # a run of metaseg <= 0.4.0
    with pytest.raises(SystemExit, match="pickle file.*metaseg convert-weights"):
        load_init(new, new_lr, tmp_path / "best_stage1.pt")

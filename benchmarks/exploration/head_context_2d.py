"""2D heads that also read the intensities around the pixel (a k x k patch of the slice), against
the shipped head (features + the pixel's intensity) and against heads with no network features.
Features: the shipped init fitted 20 steps (the shipped plan) to slices 95, 97, ..., 123 of every
training subject (8192 random canvas pixels each) and to every brain pixel of the validation
slices 105/109/113. Usage: head_context_2d.py [threads] [a] [b]; the fitted features are cached in
runs/exp/context2d_feats.pt (~1 GB)."""
import sys
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as nnf
sys.path.insert(0, "MetaSegCore")
from metaseg.method.weights import load_weights
from metaseg.train.meta_train import settings_for, prepare_tasks
from metaseg.io.data import load_splits
from metaseg.method.preprocess import grid_coords
from metaseg.metrics import dice_per_class, foreground_dice
from common import fit_features_2d, train_head_2d

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
w = load_weights(Path("Resources/Weights/metaseg2d.safetensors"))
net = w.build()
s = settings_for(2)
grid = grid_coords(s.canvas)
root, sp = Path("../shared/data/brains"), load_splits()


def patches(img: torch.Tensor, k: int, dilation: int = 1) -> torch.Tensor:
    """(H*W, k*k) intensities of the k x k neighbourhood (every `dilation`-th pixel) of every pixel,
    zeros outside the canvas."""
    return nnf.unfold(img[None, None], k, dilation=dilation, padding=dilation * (k // 2))[0].T


def collect(tasks, gen, npts=None):
    """Features (half) at the chosen pixels, their flat indices, labels."""
    F, I, L = [], [], []
    for t in tasks:
        f = fit_features_2d(net, w, grid, t.image, gen)
        v = t.image.reshape(-1)
        idx = torch.randint(0, v.numel(), (npts,), generator=gen) if npts else torch.nonzero(v > 0).squeeze(1)
        F.append(f[idx].half()); I.append(idx); L.append(t.labels.reshape(-1).long()[idx])
    return torch.cat(F), I, torch.cat(L)


def context(tasks, I, scales):
    """Patch intensities at the chosen pixels for each (k, dilation) in `scales`."""
    return torch.cat([torch.cat([patches(t.image, k, d)[i] for k, d in scales], 1) for t, i in zip(tasks, I)]).half()


gen = torch.Generator().manual_seed(0)
train = prepare_tasks(root, sp["train"], s, tuple(range(95, 124, 2)))
val = prepare_tasks(root, sp["validation"], s, s.val_slices)
cache = Path("runs/exp/context2d_feats.pt")
if cache.exists():
    tF, tI, tL, vF, vI, vL = torch.load(cache, weights_only=True)
else:
    tF, tI, tL = collect(train, gen, 8192)
    vF, vI, vL = collect(val, gen)
    torch.save((tF, tI, tL, vF, vI, vL), cache)
val_n = np.cumsum([0] + [int((t.image > 0).sum()) for t in val])
train_brain = context(train, tI, [(1, 1)])[:, 0] > 0  # training pixels inside the brain
print("features done", flush=True)


def run(name, scales, network=True, steps=4000, seed=0):
    """A stage-2-like head on [network features,] the intensity patches of `scales`."""
    fx = lambda F, P: torch.cat([F, P], 1) if network else P
    tP, vP = context(train, tI, scales), context(val, vI, scales)
    X = fx(tF, tP)
    head = train_head_2d(X, tL, steps, seed=seed)
    with torch.no_grad():
        p = head(fx(vF, vP).float()).argmax(1)
        m = train_brain
        tr = foreground_dice(head(X[m][:200000].float()).argmax(1).numpy(), tL[m][:200000].numpy())
    ds, pc = [], []
    for k, t in enumerate(val):
        lab = t.labels.reshape(-1).numpy()
        pred = np.zeros_like(lab, dtype=np.int64)
        pred[(t.image.reshape(-1) > 0).numpy()] = p[val_n[k]:val_n[k + 1]].numpy()
        ds.append(foreground_dice(pred, lab))
        d = dice_per_class(pred, lab); pc.append([d[c] for c in range(1, 5)])
    print(f"{name:26s} in={X.shape[1]:4d} val fg {np.mean(ds):.4f} train-px {tr:.4f} per-img {[round(x, 3) for x in ds]} "
          f"classes {np.round(np.nanmean(pc, 0), 3).tolist()}", flush=True)


which = sys.argv[2:] or ["a"]
if "a" in which:
    run("F+I (shipped design)", [(1, 1)])
    run("F+3x3", [(3, 1)])
    run("F+5x5", [(5, 1)])
    run("F+7x7", [(7, 1)])
    run("I only (no network)", [(1, 1)], network=False)
    run("7x7 only (no network)", [(7, 1)], network=False)
if "b" in which:  # wider context: the same patch at several pixel spacings
    run("F+5x5 at 1,3 px", [(5, 1), (5, 3)])
    run("F+5x5 at 1,3,9 px", [(5, 1), (5, 3), (5, 9)])
    run("F+3x3 at 1,2,4,8 px", [(3, 1), (3, 2), (3, 4), (3, 8)])
    run("5x5 at 1,3,9 px (no network)", [(5, 1), (5, 3), (5, 9)], network=False)

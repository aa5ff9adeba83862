"""2D heads that also read the intensities around the pixel (a k x k patch of the slice), against
the shipped head (features + the pixel's intensity) and against heads with no network features.
Features: the shipped init fitted 20 steps (the shipped plan) to slices 95, 97, ..., 123 of every
training subject (8192 random canvas pixels each) and to every brain pixel of the validation
slices 105/109/113. Usage: head_context_2d.py [threads]."""
import sys
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as nnf
sys.path.insert(0, "MetaSegCore")
from metaseg.weights import load_weights
from metaseg.meta_train import settings_for, prepare_tasks
from metaseg.data import load_splits
from metaseg.fit import adapt
from metaseg.preprocess import grid_coords
from metaseg.metrics import dice_per_class, foreground_dice
from common import mlp_head

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
w = load_weights(Path("Resources/Weights/metaseg2d.pt"))
net = w.build()
s = settings_for(2)
grid = grid_coords(s.canvas)
root, sp = Path("../shared/data/brains"), load_splits()
K = 7  # widest patch; narrower ones are its centre


def patches(img: torch.Tensor) -> torch.Tensor:
    """(H*W, K*K) intensities of the K x K neighbourhood of every pixel (zeros outside the canvas)."""
    return nnf.unfold(img[None, None], K, padding=K // 2)[0].T


def collect(tasks, gen, npts=None):
    F, P, L = [], [], []
    init = {k: p.detach() for k, p in net.named_parameters()}
    for t in tasks:
        fast = init
        for _, _, fast in adapt(net, init, grid, t.image.reshape(-1), w.plan, w.log_lr, generator=gen):
            pass
        with torch.no_grad():
            _, f = torch.func.functional_call(net, fast, (grid,))
        v = t.image.reshape(-1)
        idx = torch.randint(0, v.numel(), (npts,), generator=gen) if npts else torch.nonzero(v > 0).squeeze(1)
        F.append(f[idx].half()); P.append(patches(t.image)[idx]); L.append(t.labels.reshape(-1).long()[idx])
    return torch.cat(F), torch.cat(P), torch.cat(L)


gen = torch.Generator().manual_seed(0)
train = prepare_tasks(root, sp["train"], s, tuple(range(95, 124, 2)))
val = prepare_tasks(root, sp["validation"], s, s.val_slices)
tF, tP, tL = collect(train, gen, 8192)
vF, vP, vL = collect(val, gen)
val_n = np.cumsum([0] + [int((t.image > 0).sum()) for t in val])
print("features done", flush=True)


def centre(P, k):
    """The k x k centre of the K x K patches."""
    idx = torch.arange(K * K).reshape(K, K)[K // 2 - k // 2: K // 2 + k // 2 + 1, K // 2 - k // 2: K // 2 + k // 2 + 1]
    return P[:, idx.reshape(-1)]


def run(name, fx, steps=4000, seed=0):
    torch.manual_seed(seed)
    X = fx(tF, tP)
    head = mlp_head(X.shape[1])
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (8192,))
        logp = torch.log_softmax(head(X[idx].float()), -1).gather(1, tL[idx][:, None]).squeeze(1)
        loss = torch.mean(-(1 - logp.exp()) * logp)  # focal gamma 1, as stage 2
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        p = head(fx(vF, vP).float()).argmax(1)
        m = tP[:, K * K // 2] > 0
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


run("F+I (shipped design)", lambda F, P: torch.cat([F, centre(P, 1).half()], 1))
run("F+3x3", lambda F, P: torch.cat([F, centre(P, 3).half()], 1))
run("F+5x5", lambda F, P: torch.cat([F, centre(P, 5).half()], 1))
run("F+7x7", lambda F, P: torch.cat([F, P.half()], 1))
run("I only (no network)", lambda F, P: centre(P, 1).half())
run("7x7 only (no network)", lambda F, P: P.half())

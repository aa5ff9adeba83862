import os, sys, time, numpy as np, torch
from pathlib import Path
from torch.func import functional_call
from metaseg.weights import load_weights
from metaseg.data import load_volume, load_splits
from metaseg.segment import segment_array
from metaseg.preprocess import grid_coords, normalize_intensity
from metaseg.metrics import foreground_dice
torch.set_num_threads(2)
w = load_weights(Path(os.environ["WEIGHTS"])); net = w.build()
sp = load_splits()
def allfeats(params, coords):
    out = []; x = coords
    with torch.no_grad():
        for s in range(0, coords.shape[0], 65536):
            x = coords[s:s+65536]; fs = []
            for i, layer in enumerate(net.trunk):
                x = torch.sin(layer.omega0 * torch.nn.functional.linear(x, params[f"trunk.{i}.linear.weight"], params[f"trunk.{i}.linear.bias"]))
                fs.append(x)
            out.append(torch.cat(fs, 1))
    return torch.cat(out)
def sample(subj, n, fits=1):
    v = load_volume(Path("../shared/data/brains")/subj)
    img = normalize_intensity(v.image)
    out = []
    for k in range(fits):
        res = segment_array(net, w.log_lr, w.plan, v.image, w.canvas, decode=False, seed=k)
        flat = np.flatnonzero(img.reshape(-1) > 0)
        sel = np.random.default_rng(k).choice(flat, n, replace=False)
        coords = grid_coords(w.canvas, torch.from_numpy(sel))
        FA = allfeats(res.fitted.params, coords)
        I = torch.from_numpy(img.reshape(-1)[sel]).float()[:, None]
        y = torch.from_numpy(v.labels.reshape(-1)[sel].astype(np.int64))
        out.append((FA, I, y))
        print(subj, k, res.psnr, flush=True)
    return [torch.cat(t) for t in zip(*out)]
t = time.time()
tr = [torch.cat(t) for t in zip(*[sample(s, 60000, fits=2) for s in sp["train"]])]
val = {s: sample(s, 300000) for s in sp["validation"]}
torch.save({"tr": tr, "val": val}, "runs/exp/feats3d.pt")
print("sampled", time.time() - t, flush=True)
W = 128
def run(name, fx, hidden=128, layers=1, steps=4000):
    torch.manual_seed(0)
    X = fx(*tr[:2]); y = tr[2]
    mods = [torch.nn.Linear(X.shape[1], hidden), torch.nn.LeakyReLU(0.01)]
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.LeakyReLU(0.01)]
    head = torch.nn.Sequential(*mods, torch.nn.Linear(hidden, 5))
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    for i in range(steps):
        idx = torch.randint(0, X.shape[0], (8192,))
        loss = torch.nn.functional.cross_entropy(head(X[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        r = {s: round(foreground_dice(head(fx(F, I)).argmax(1).numpy(), yv.numpy()), 4) for s, (F, I, yv) in val.items()}
    print(name, hidden, layers, steps, r, "mean", round(np.mean(list(r.values())), 4), flush=True)
pen = lambda F, I: torch.cat([F[:, -W:], I], 1)
run("F+I", pen)
run("F+I big", pen, hidden=256, layers=2, steps=8000)
run("Fall+I", lambda F, I: torch.cat([F, I], 1))
run("Fall+I big", lambda F, I: torch.cat([F, I], 1), hidden=256, layers=2, steps=8000)

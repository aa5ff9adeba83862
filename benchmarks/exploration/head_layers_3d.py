import os, time, numpy as np, torch
from pathlib import Path
from metaseg.method.weights import load_weights
from metaseg.io.data import load_splits
from metaseg.metrics import foreground_dice
from common import fitted_samples, mlp_head
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
    out = []
    for k, (res, img, labels, sel, coords) in enumerate(fitted_samples(net, w, subj, n, fits)):
        FA = allfeats(res.fitted.params, coords)
        I = torch.from_numpy(img.reshape(-1)[sel]).float()[:, None]
        y = torch.from_numpy(labels.reshape(-1)[sel].astype(np.int64))
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
    head = mlp_head(X.shape[1], hidden, layers)
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

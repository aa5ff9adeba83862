import os, time, numpy as np, torch
from pathlib import Path
from metaseg.method.weights import load_weights
from metaseg.io.data import load_splits
from metaseg.metrics import foreground_dice
from common import fitted_samples, mlp_head
torch.set_num_threads(2)
w = load_weights(Path(os.environ["WEIGHTS"])); net = w.build()
sp = load_splits(); print(sp)
def sample(subj, n, fits=1):
    out = []
    for k, (res, img, labels, sel, coords) in enumerate(fitted_samples(net, w, subj, n, fits)):
        # 6-neighbour intensities
        zyx = np.stack(np.unravel_index(sel, img.shape), 1)
        nb = []
        for d in range(3):
            for s in (-1, 1):
                q = zyx.copy(); q[:, d] = np.clip(q[:, d] + s, 0, img.shape[d]-1)
                nb.append(img[q[:,0], q[:,1], q[:,2]])
        with torch.no_grad():
            F = res.fitted.features(coords)
        I = torch.from_numpy(img.reshape(-1)[sel]).float()[:, None]
        NB = torch.from_numpy(np.stack(nb, 1)).float()
        y = torch.from_numpy(labels.reshape(-1)[sel].astype(np.int64))
        out.append((F, I, NB, y, coords))
        print(subj, k, res.psnr, flush=True)
    return [torch.cat(t) for t in zip(*out)]
t = time.time()
train = [sample(s, 60000, fits=2) for s in sp["train"] if True]
tr = [torch.cat(t) for t in zip(*train)]
val = {s: sample(s, 300000) for s in sp["validation"]}
print("sampled", time.time() - t, flush=True)
def run(name, fx):
    torch.manual_seed(0)
    X = fx(*tr[:3], tr[4]); y = tr[3]
    head = mlp_head(X.shape[1])
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    for i in range(4000):
        idx = torch.randint(0, X.shape[0], (8192,))
        loss = torch.nn.functional.cross_entropy(head(X[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    r = {}
    with torch.no_grad():
        for s, (F, I, NB, yv, c) in val.items():
            r[s] = round(foreground_dice(head(fx(F, I, NB, c)).argmax(1).numpy(), yv.numpy()), 4)
    print(name, r, flush=True)
with torch.no_grad():
    for s, (F, I, NB, yv, c) in val.items():
        print("shipped head", s, foreground_dice(net.head(F).argmax(1).numpy(), yv.numpy()))
run("F", lambda F, I, NB, c: F)
run("F+I", lambda F, I, NB, c: torch.cat([F, I], 1))
run("F+I+NB", lambda F, I, NB, c: torch.cat([F, I, NB], 1))
run("c+I+NB (no INR)", lambda F, I, NB, c: torch.cat([c, I, NB], 1))
run("I+NB (no INR, no coords)", lambda F, I, NB, c: torch.cat([I, NB], 1))

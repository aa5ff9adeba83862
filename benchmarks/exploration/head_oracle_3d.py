import os, sys, time, numpy as np, torch
from pathlib import Path
from metaseg.method.weights import load_weights
from metaseg.io.data import load_volume
from metaseg.method.segment import segment_array
from metaseg.method.preprocess import grid_coords, normalize_intensity
from metaseg.metrics import foreground_dice
from common import mlp_head
torch.set_num_threads(2)
w = load_weights(Path(os.environ["WEIGHTS"])); net = w.build()
subj = sys.argv[1] if len(sys.argv) > 1 else "ws01"
v = load_volume(Path("../shared/data/brains")/subj)
t=time.time()
res = segment_array(net, w.log_lr, w.plan, v.image, w.canvas, decode=False)
print("fit", time.time()-t, res.psnr)
img = normalize_intensity(v.image)
flat = np.flatnonzero(img.reshape(-1) > 0)
lab = v.labels.reshape(-1)[flat]
g = torch.Generator().manual_seed(0)
perm = torch.randperm(len(flat), generator=g).numpy()
sel = flat[perm[:400000]]; y = torch.from_numpy(v.labels.reshape(-1)[sel].astype(np.int64))
coords = grid_coords(w.canvas, torch.from_numpy(sel))
with torch.no_grad():
    F = res.fitted.features(coords)
    yhat = res.fitted.labels(coords)
print("shipped head dice (400k pts)", foreground_dice(yhat.numpy(), y.numpy()))
tr, te = slice(0, 300000), slice(300000, None)
def trainhead(X, y, steps=3000, hidden=128):
    head = mlp_head(X.shape[1], hidden)
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    for i in range(steps):
        idx = torch.randint(0, X[tr].shape[0], (8192,))
        loss = torch.nn.functional.cross_entropy(head(X[tr][idx]), y[tr][idx])
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        return foreground_dice(head(X[te]).argmax(1).numpy(), y[te].numpy())
print("oracle head on features", trainhead(F, y))
I = torch.from_numpy(img.reshape(-1)[sel]).float()[:, None]
print("oracle head on coords+intensity", trainhead(torch.cat([coords, I], 1), y))
print("oracle head on features+intensity", trainhead(torch.cat([F, I], 1), y))

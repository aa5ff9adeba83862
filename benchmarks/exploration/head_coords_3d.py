"""Does a coordinate input help the 3D head? Reuses runs/exp/feats3d.pt (head_layers_3d.py's features)
and recomputes the sampled voxels' coordinates from the same seeds."""
import sys, numpy as np, torch
from pathlib import Path
sys.path.insert(0, "MetaSegCore")
from metaseg.io.data import load_volume, load_splits
from metaseg.method.preprocess import grid_coords, normalize_intensity
from metaseg.metrics import foreground_dice, dice_per_class
from common import mlp_head, pick_voxels
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
canvas = (224, 192, 160)
sp = load_splits()
D = torch.load("runs/exp/feats3d.pt", weights_only=True)
def coords(subj, n, fits=1):
    v = load_volume(Path("../shared/data/brains") / subj)
    img = normalize_intensity(v.image)
    return torch.cat([grid_coords(canvas, torch.from_numpy(pick_voxels(img, n, k))) for k in range(fits)])
trC = torch.cat([coords(s, 60000, 2) for s in sp["train"]])
valC = {s: coords(s, 300000) for s in sp["validation"]}
tr = D["tr"]; val = D["val"]
assert trC.shape[0] == tr[0].shape[0]
def run(name, fx, steps=4000, hidden=128):
    torch.manual_seed(0)
    X = fx(tr[0], tr[1], trC); y = tr[2]
    head = mlp_head(X.shape[1], hidden)
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    for i in range(steps):
        idx = torch.randint(0, X.shape[0], (8192,))
        loss = torch.nn.functional.cross_entropy(head(X[idx]), y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    r = {}
    with torch.no_grad():
        for s, (F, I, yv) in val.items():
            p = head(fx(F, I, valC[s])).argmax(1).numpy()
            d = dice_per_class(p, yv.numpy())
            r[s] = (round(foreground_dice(p, yv.numpy()), 4), [round(d[c], 3) for c in range(1, 5)])
    print(name, steps, r, "mean", round(np.mean([v[0] for v in r.values()]), 4), flush=True)
run("Fall+I", lambda F, I, C: torch.cat([F, I], 1))
run("Fall+I+C", lambda F, I, C: torch.cat([F, I, C], 1))
run("Fall+I+C 8k", lambda F, I, C: torch.cat([F, I, C], 1), steps=8000)

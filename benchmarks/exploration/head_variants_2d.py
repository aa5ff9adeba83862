"""Heads trained on the 2D features cached by head_features_2d.py; sets a, b, c (README)."""
import sys, numpy as np, torch
sys.path.insert(0, "MetaSegCore")
from metaseg.metrics import foreground_dice, dice_per_class
from common import train_head_2d
torch.set_num_threads(2)
D = torch.load("runs/exp/head2d_cache.pt", weights_only=True)
names = D["train_names"]
slice_of = torch.tensor([int(n.split("@")[1]) for n in names]).repeat_interleave(8192)
def sel(keys, slices, cap=1800000):
    m = torch.isin(slice_of, torch.tensor(slices))
    n = int(m.sum()) * len(keys)
    if n > cap:  # keep a random subset of each key's points
        keep = torch.rand(m.shape[0], generator=torch.Generator().manual_seed(1)) < cap / n
        m = m & keep
    out = [[D[k][j][m] for k in keys] for j in range(4)]
    return [torch.cat(x) for x in out]
vF, vI, vC, vL = D["val"]
bounds = np.cumsum([0] + D["val_n"])
def run(name, keys, slices, fx, steps=4000, hidden=128, seed=0, layers=1):
    F, I, C, L = sel(keys, slices)
    X = fx(F, I, C)
    head = train_head_2d(X, L, steps, hidden, layers, seed)
    with torch.no_grad():
        p = head(fx(vF, vI, vC).float()).argmax(1)
        m = (I > 0)
        ptr = head(X[m][:200000].float()).argmax(1).numpy(); ltr = L[m][:200000].numpy()
        print("   train-pixels fg", round(foreground_dice(ptr, ltr), 4))
    ds, pc = [], []
    for k, lab in enumerate(D["val_lab"]):
        pred = torch.zeros(lab.numel(), dtype=torch.long)
        inside = torch.nonzero(D_val_mask[k]).squeeze(1)
        pred[inside] = p[bounds[k]:bounds[k + 1]]
        ds.append(foreground_dice(pred.numpy(), lab.reshape(-1).numpy()))
        d = dice_per_class(pred.numpy(), lab.reshape(-1).numpy()); pc.append([d[c] for c in range(1, 5)])
    print(f"{name:28s} n={X.shape[0]:7d} fg {np.mean(ds):.4f} per-img {[round(x,3) for x in ds]} classes {np.round(np.nanmean(pc,0),3).tolist()}", flush=True)
# masks of the validation slices' brain pixels, from the images
from pathlib import Path
from metaseg.train.meta_train import settings_for, prepare_tasks
from metaseg.io.data import load_splits
s = settings_for(2)
val = prepare_tasks(Path("../shared/data/brains"), load_splits()["validation"], s, s.val_slices)
D_val_mask = [t.image.reshape(-1) > 0 for t in val]
FI = lambda F, I, C: torch.cat([F, I[:, None].half()], 1)
FIC = lambda F, I, C: torch.cat([F, I[:, None].half(), C.half()], 1)
base = list(range(95, 124, 2))
dense = list(range(93, 126))
which = sys.argv[1:] or ["all"]
if "a" in which or "all" in which:
    run("base F+I", ["train"], base, FI)
    run("base F+I+C", ["train"], base, FIC)
    run("flip F+I", ["train", "trainflip"], base, FI)
    run("flip F+I+C", ["train", "trainflip"], base, FIC)
if "c" in which:
    run("dense+flip F+I big", ["train", "trainflip"], dense, FI, steps=8000, hidden=256, layers=2)
    run("base F+I big", ["train"], base, FI, steps=8000, hidden=256, layers=2)
if "b" in which or "all" in which:
    run("dense F+I", ["train"], dense, FI)
    run("dense+flip F+I", ["train", "trainflip"], dense, FI)

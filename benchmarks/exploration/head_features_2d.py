"""2D head experiments on cached features of the shipped init (20-step fits).
Train features: fits of training slices (optionally LR-flipped / denser slices); val: full brains of val slices."""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, "MetaSegCore")
from metaseg.method.weights import load_weights
from metaseg.train.meta_train import settings_for, prepare_tasks
from metaseg.io.data import load_splits
from metaseg.method.preprocess import grid_coords
from common import fit_features_2d
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
w = load_weights(Path("Resources/Weights/metaseg2d.safetensors"))
net = w.build()
s = settings_for(2)
root = Path("../shared/data/brains"); sp = load_splits()
grid = grid_coords(s.canvas)
def collect(tasks, gen, npts=None, flip=False):
    F, I, C, L = [], [], [], []
    for t in tasks:
        img, lab = t.image, t.labels
        if flip:
            img, lab = img.flip(1), lab.flip(1)
        f = fit_features_2d(net, w, grid, img, gen)
        v = img.reshape(-1); l = lab.reshape(-1).long()
        idx = torch.randint(0, v.numel(), (npts,), generator=gen) if npts else torch.nonzero(v > 0).squeeze(1)
        F.append(f[idx].half()); I.append(v[idx]); C.append(grid[idx]); L.append(l[idx])
    return torch.cat(F), torch.cat(I), torch.cat(C), torch.cat(L)
cache = Path("runs/exp/head2d_cache.pt")
if cache.exists():
    D = torch.load(cache, weights_only=True)
else:
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    train = prepare_tasks(root, sp["train"], s, tuple(range(93, 126)))
    val = prepare_tasks(root, sp["validation"], s, s.val_slices)
    D = {}
    D["val"] = collect(val, gen)
    D["val_n"] = [int((t.image > 0).sum()) for t in val]
    D["val_lab"] = [t.labels for t in val]
    names = [t.name for t in train]
    D["train_names"] = names
    D["train"] = collect(train, gen, 8192)
    D["trainflip"] = collect(train, gen, 8192, flip=True)
    print("features", time.time() - t0, flush=True)
    torch.save(D, cache)

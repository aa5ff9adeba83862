"""What these 7 training subjects support at all: a plain supervised 2D U-Net (no INR, labels
learnt from the same training slices) scored like the MetaSeg heads, on the brain pixels of the
validation slices 105/109/113 of ws01 and ecog. Not MetaSeg; a reference for the Dice target.
Mode `volumes`: trained on every coronal slice of the training volumes (each volume normalized
once, as the 3D model does) and scored on the whole validation volumes, slice by slice: a
reference for the 3D target. Usage: unet_ceiling_2d.py [threads] [iterations] [slices|volumes] [data] [labels].
`labels`: tissues (default) or structures (the 31 structures of a `metaseg prepare --label-set structures`
pack; no left-right mirroring then, since it would swap the sides).
`data`: a `metaseg prepare` pack holding every subject of splits.json (both label groups; default: the
FreeSurfer subjects' aligned files in ../shared/data/brains, the split of the earlier rounds)."""
import sys
import time
from pathlib import Path
import numpy as np
import torch
import torch.nn as nn
sys.path.insert(0, "MetaSegCore")
from metaseg.train.meta_train import settings_for, prepare_tasks
from metaseg.io.data import load_splits, load_volume
from metaseg.method.preprocess import normalize_intensity, pad_to_canvas
from metaseg.metrics import dice_per_class, foreground_dice, generalized_dice

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
torch.manual_seed(0)
LABELS = sys.argv[5] if len(sys.argv) > 5 else "tissues"
s = settings_for(2, label_set=LABELS)
N = s.model.n_classes
FG = tuple(range(1, N))
root, sp = Path(sys.argv[4] if len(sys.argv) > 4 else "../shared/data/brains"), load_splits()
volumes = len(sys.argv) > 3 and sys.argv[3] == "volumes"


def volume_slices(subj):
    """(images, labels) of every coronal slice of `subj`'s aligned volume, on the 2D canvas."""
    v = load_volume(root / subj)
    img = normalize_intensity(v.image)
    pad = lambda a: torch.from_numpy(np.stack([pad_to_canvas(x, s.canvas)[0] for x in a]))
    return pad(img), pad(np.asarray(s.labels.index_lut(), np.uint8)[v.labels])  # label values -> class indices


if volumes:
    parts = [volume_slices(subj) for subj in sp["train"]]
    X = torch.cat([p[0] for p in parts])[:, None]
    Y = torch.cat([p[1] for p in parts]).long()
    keep = (X > 0).flatten(1).any(1)  # slices with brain
    X, Y = X[keep], Y[keep]
    val = [volume_slices(subj) for subj in sp["validation"]]
else:
    train = prepare_tasks(root, sp["train"], s, tuple(range(95, 124, 2)))
    X = torch.stack([t.image for t in train])[:, None]
    Y = torch.stack([t.labels for t in train]).long()
    val = [(t.image[None], t.labels[None]) for t in prepare_tasks(root, sp["validation"], s, s.val_slices)]
print(f"{X.shape[0]} training slices", flush=True)


def block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                         nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, c=16, levels=4):
        super().__init__()
        ch = [c * 2 ** k for k in range(levels)]
        self.down = nn.ModuleList([block(1 if k == 0 else ch[k - 1], ch[k]) for k in range(levels)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[k], ch[k - 1], 2, stride=2) for k in range(levels - 1, 0, -1)])
        self.dec = nn.ModuleList([block(2 * ch[k - 1], ch[k - 1]) for k in range(levels - 1, 0, -1)])
        self.out = nn.Conv2d(c, N, 1)

    def forward(self, x):
        skips = []
        for k, d in enumerate(self.down):
            x = d(x if k == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for u, d, sk in zip(self.up, self.dec, reversed(skips[:-1])):
            x = d(torch.cat([u(x), sk], 1))
        return self.out(x)


CROP = 112
net = UNet()
opt = torch.optim.Adam(net.parameters(), 1e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
t0 = time.time()


def evaluate():
    net.eval()
    ds, gd, pc = [], [], []
    with torch.no_grad():
        for img, lab in val:  # a slice, or a volume's slices
            p = torch.cat([net(img[k:k + 16, None]).argmax(1) for k in range(0, img.shape[0], 16)]).reshape(-1).numpy()
            lab = lab.reshape(-1).numpy()
            p[(img.reshape(-1) <= 0).numpy()] = 0  # brain pixels only, as the MetaSeg heads
            ds.append(foreground_dice(p, lab, FG)); gd.append(generalized_dice(p, lab, N))
            d = dice_per_class(p, lab, N); pc.append([d[c] for c in FG])
    net.train()
    names = [n for n in sp["validation"] for _ in range(1 if volumes else len(s.val_slices))]
    by = {g: round(float(np.mean([d for d, n in zip(ds, names) if n.startswith("oas1-") == (g == "manual")])), 4)
          for g in ("freesurfer", "manual") if any(n.startswith("oas1-") == (g == "manual") for n in names)}
    return f"fg {np.mean(ds):.4f} by group {by} GDS {np.mean(gd):.4f} per-img {[round(x, 3) for x in ds]} classes {np.round(np.nanmean(pc, 0), 3).tolist()}"


for i in range(1, iters + 1):
    idx = torch.randint(0, X.shape[0], (8,))
    r, c = (int(v) for v in torch.randint(0, X.shape[-1] - CROP + 1, (2,)))  # one random 112x112 crop per batch: CPU time
    x, y = X[idx, :, r:r + CROP, c:c + CROP], Y[idx, r:r + CROP, c:c + CROP]
    flip = (torch.rand(8) < 0.5) & (LABELS == "tissues")  # left-right mirror half of each batch (not L/R labels)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x); y = torch.where(flip[:, None, None], y.flip(-1), y)
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if i % (1000 if volumes else 500) == 0 or i == iters:
        print(f"iter {i} loss {loss.item():.4f} {time.time() - t0:.0f}s validation {evaluate()}", flush=True)

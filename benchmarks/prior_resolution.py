"""What the spatial prior loses when stored coarser: the prior alone (argmax) scored on the validation brains.

For each storage factor (2: 2 mm, 4: 4 mm on the 1 mm 3D model grid) the prior of the training brains is built
as `metaseg.method.prior` builds it, rounded to its stored 8-bit form, read at every brain voxel of each
validation subject of the pack, and scored: mean Dice over the 31 structures of its argmax, and the mean
log-likelihood of the reference labels (probabilities floored at 1e-3). Run by hand, e.g.
  .venv/bin/python benchmarks/prior_resolution.py --pack pack/structures.npz
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from metaseg.io.data import load_splits
from metaseg.labelsets import label_set
from metaseg.method.preprocess import grid_coords
from metaseg.method.prior import SpatialPrior, class_fractions
from metaseg.metrics import dice_per_class


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="pack/structures.npz")
    ap.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pack = np.load(a.pack)
    labels = label_set("structures")
    lut = np.asarray(labels.index_lut(), np.int16)
    n = len(labels)
    splits = load_splits()
    for factor in a.factors:
        t0 = time.time()
        total = sum(class_fractions(lut[pack[f"{s}/labels"]], n, factor=factor) for s in splits["train"])
        prior = SpatialPrior.from_uint8(SpatialPrior(total / len(splits["train"])).to_uint8())
        dice, loglik = [], []
        for s in splits["validation"]:
            ref = lut[pack[f"{s}/labels"]].reshape(-1)
            idx = np.flatnonzero(pack[f"{s}/image"].reshape(-1) > 0)
            p = prior.at(grid_coords(pack[f"{s}/image"].shape, torch.from_numpy(idx)))
            dc = dice_per_class(p.argmax(1).numpy(), ref[idx], n)
            dice.append(np.nanmean([dc[c] for c in range(1, n)]))
            target = torch.from_numpy(ref[idx].astype(np.int64))[:, None]
            loglik.append(float(torch.log(p.clamp_min(1e-3)).gather(1, target).mean()))
        print(f"factor {factor}: mean argmax structure Dice {np.mean(dice):.4f}, mean log-likelihood "
              f"{np.mean(loglik):.4f} ({prior.probs.numel() / 1e6:.1f} MB stored, {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

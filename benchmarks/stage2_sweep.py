"""Redo stage 2 (head fine-tuning) of a run's chosen initialization under another test-time fit.

Used to pick the shipped test-time plan (docs/results.md, "Exploration"). Run by hand:
  .venv/bin/python benchmarks/stage2_sweep.py runs/E2 --steps 60 --batch 4096 --lr 1e-4 --head-steps 4000
`--lr 0` keeps the run's meta-learned per-step learning rates. Prints validation fg-Dice
(slices 105/109/113 of the validation subjects) and the Dice on every 10th training image.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from metaseg.data import load_splits
from metaseg.fit import FitPlan
from metaseg.meta_train import Log, TrainSettings, prepare_tasks, train_head, validate
from metaseg.model import MetaSegNet
from metaseg.preprocess import grid_coords


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="run folder with best_stage1.pt")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-steps", type=int, default=4000)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--head-fits", type=int, default=1)
    ap.add_argument("--data", default="../shared/data/brains")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    best = torch.load(Path(a.run) / "best_stage1.pt", map_location="cpu", weights_only=True)
    s = TrainSettings(plan=FitPlan(a.steps, a.batch), head_steps=a.head_steps, head_lr=a.head_lr,
                      head_fits_per_image=a.head_fits, test_steps=0, test_batch=0, test_lr=0)
    net = MetaSegNet(s.model)
    net.load_state_dict(best["net"])
    log_lr = torch.full((1, best["log_lr"].shape[1]), math.log(a.lr)) if a.lr > 0 else best["log_lr"]
    splits = load_splits()
    root = Path(a.data)
    train = prepare_tasks(root, splits["train"], s.train_slices, s.canvas)
    val = prepare_tasks(root, splits["validation"], s.val_slices, s.canvas)
    t0 = time.time()
    head = train_head(net, log_lr, s, train, grid_coords(s.canvas), torch.Generator().manual_seed(0), Log(Path("/dev/null")))
    v = validate(net, log_lr, s.test_plan, val, s.canvas)
    tr = validate(net, log_lr, s.test_plan, train[::10], s.canvas)
    print(f"\nfit {a.steps} steps x {a.batch} px, lr {a.lr or 'learned'}; head {a.head_steps} steps lr {a.head_lr}: "
          f"validation fg-Dice {v['fg_dice']:.3f} (GDS {v['gds']:.3f}), train {tr['fg_dice']:.3f}, "
          f"head focal {head['final_focal']:.3f}, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""How the 2D test-time fit's batches change slice 109's structure Dice (docs/results.md, part 6).

Each validation subject's coronal slice 109 (structures pack) is fitted with the weights' plan changed as asked:
`--batch` pixels per step (36864: the whole 192x192 canvas, no random draw), `--schedule random|fixed`, `--steps`;
with `--fits K` K fits of seeds 0..K-1 are averaged in probability. Scored as `eval_groups.py 2d --labels
structures` scores (mean over the structures present, hippocampus L/R mean), per label-protocol group.

  PYTHONPATH=MetaSegCore .venv/bin/python benchmarks/exploration/fit_batch_2d.py --batch 4096 --fits 5
  PYTHONPATH=MetaSegCore .venv/bin/python benchmarks/exploration/fit_batch_2d.py --batch 36864
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: eval_groups' scoring
from eval_groups import scores  # noqa: E402
from metaseg.io.data import PAPER_SLICE, coronal_slices, label_group, load_splits, subject_dir  # noqa: E402
from metaseg.labelsets import STRUCTURES  # noqa: E402
from metaseg.method.preprocess import grid_coords  # noqa: E402
from metaseg.method.segment import segment_array  # noqa: E402
from metaseg.method.weights import load_weights  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--weights", default="Resources/Weights/metaseg2d_structures.safetensors")
ap.add_argument("--pack", default="pack/structures.npz")
ap.add_argument("--data", default="../shared/data")
ap.add_argument("--batch", type=int, help="pixels per step (default: the card's)")
ap.add_argument("--schedule", choices=("random", "fixed"))
ap.add_argument("--steps", type=int)
ap.add_argument("--fits", type=int, default=1)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
w = load_weights(Path(a.weights))
net = w.build()
changes = {k: v for k, v in (("batch_size", a.batch), ("schedule", a.schedule), ("steps", a.steps)) if v is not None}
plan = dataclasses.replace(w.plan, **changes)
values = np.asarray(net.values, np.uint8)
groups = {}
for s in load_splits()["validation"]:
    sl = coronal_slices(Path(a.pack) / s, [PAPER_SLICE])[0]
    probs = 0
    for k in range(a.fits):
        r = segment_array(net, w.log_lr, plan, sl.image, w.canvas, seed=k)
        probs = probs + r.fitted.probabilities(grid_coords(w.canvas)).reshape(*w.canvas, -1)[r.region]
    row = scores(values[probs.argmax(-1).numpy()], sl.labels, 0.001, STRUCTURES)
    g = label_group(subject_dir(Path(a.data), s))
    groups.setdefault(g, []).append((row["fg_dice"], row["dice_hippocampus"]))
    print(s, g, row["fg_dice"], row["dice_hippocampus"], flush=True)
print(plan, f"fits {a.fits}")
for g, v in sorted(groups.items()):
    print(g, "mean structure Dice %.4f, hippocampus %.4f" % tuple(np.mean(v, 0)))

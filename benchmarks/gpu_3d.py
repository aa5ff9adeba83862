"""3D timing on a GPU machine without SimpleITK: the shipped weights on packed aligned volumes,
and the paper's test-time setting, in one process.

  python -c "...pack_volumes(...)"   # see Resources/Weights/metaseg3d.md: pack/aligned.npz
  PYTHONPATH=MetaSegCore python3 benchmarks/gpu_3d.py --data pack/aligned.npz [--device cuda]

Ours: 400 stochastic steps + labels of every brain voxel at full resolution (segment_array on the
aligned array, as `metaseg segment` does for aligned files). Paper: SIREN 3->256 x4, 300 full-batch
Adam steps on an 80x80x100 grid (fit only, no decoding). Three repeats each; CUDA synchronized.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from metaseg.method.config import PAPER_3D
from metaseg.io.data import load_volume
from metaseg.method.fit import FitPlan, adapt
from metaseg.metrics import foreground_dice
from metaseg.method.model import MetaSegNet
from metaseg.method.preprocess import grid_coords
from metaseg.method.segment import segment_array
from metaseg.method.weights import load_weights


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="pack/aligned.npz")
    ap.add_argument("--weights", default="Resources/Weights/metaseg3d.safetensors")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--subjects", nargs="+", default=["ecog", "ws01"])
    a = ap.parse_args()
    dev = torch.device(a.device)
    w = load_weights(Path(a.weights))
    net = w.build(dev)
    for subj in a.subjects:
        v = load_volume(Path(a.data) / subj)
        for rep in range(3):
            sync(dev)
            t = time.perf_counter()
            r = segment_array(net, w.log_lr, w.plan, v.image, w.canvas, seed=0)
            sync(dev)
            print(f"ours {subj} #{rep}: {time.perf_counter() - t:.2f} s, fg-Dice {foreground_dice(r.labels, v.labels):.4f}",
                  flush=True)
    paper = MetaSegNet(PAPER_3D).to(dev)
    coords = grid_coords((100, 80, 80)).to(dev)
    values = torch.rand(coords.shape[0], device=dev)
    lr = torch.full((1, len(paper.inr_parameter_names())), math.log(1e-4), device=dev)
    params = {k: p.detach() for k, p in paper.named_parameters()}
    for rep in range(2):
        sync(dev)
        t = time.perf_counter()
        for _ in adapt(paper, params, coords, values, FitPlan(steps=300, batch_size=coords.shape[0]), lr):
            pass
        sync(dev)
        print(f"paper setting #{rep}: 300 full-batch steps in {time.perf_counter() - t:.2f} s", flush=True)
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

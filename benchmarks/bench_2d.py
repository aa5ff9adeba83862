"""2D benchmark: Dice, PSNR and time per slice on the validation and test subjects.

Run by hand (not a test):  .venv/bin/python benchmarks/bench_2d.py --weights Resources/Weights/metaseg2d.safetensors
Prints a markdown table per experiment and writes them as JSON with --json.

Experiments (all on the paper's slice 109 of each held-out subject, same process, same machine):
  default   the weights' own test-time plan (steps, batch, meta-learned learning rates)
  steps     Dice/PSNR against the number of test-time steps
  paper     the paper's test-time setting from the same init: 100 full-batch Adam steps at lr 1e-4
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metaseg.io.data import load_slice, load_splits
from metaseg.method.fit import FitPlan
from metaseg.metrics import foreground_dice, generalized_dice
from metaseg.method.segment import segment_array
from metaseg.method.weights import load_weights


def run(net, log_lr, plan, subjects, data, canvas, repeats=1):
    rows = []
    for s in subjects:
        sl = load_slice(Path(data) / s)
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            res = segment_array(net, log_lr, plan, sl.image, canvas, seed=0)
            times.append(time.perf_counter() - t0)
        rows.append({"subject": s, "fg_dice": foreground_dice(res.labels, sl.labels),
                     "gds": generalized_dice(res.labels, sl.labels), "psnr": res.psnr,
                     "seconds": float(np.median(times))})
    return rows


def summary(rows):
    fg = np.array([r["fg_dice"] for r in rows])
    return {"fg_dice": float(fg.mean()), "fg_sd": float(fg.std()), "gds": float(np.mean([r["gds"] for r in rows])),
            "psnr": float(np.mean([r["psnr"] for r in rows])), "seconds": float(np.mean([r["seconds"] for r in rows]))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="Resources/Weights/metaseg2d.safetensors")
    ap.add_argument("--data", default="../shared/data/brains")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--experiments", nargs="+", default=["default", "steps", "paper"])
    ap.add_argument("--steps-list", type=int, nargs="+", default=[2, 10, 20, 50, 100, 500])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per slice for the default plan (median)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    w = load_weights(Path(a.weights))
    net = w.build()
    sp = load_splits()
    subjects = sp["validation"] + sp["test"]
    out = {"weights": a.weights, "sha256": w.sha256, "machine": f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", "command": " ".join(sys.argv)}
    print(f"# {a.weights} ({w.sha256[:12]}), {out['machine']}\n")
    if "default" in a.experiments:
        rows = run(net, w.log_lr, w.plan, subjects, a.data, w.canvas, repeats=a.repeats)
        out["default"] = {"plan": w.plan.to_dict(), "rows": rows, "summary": summary(rows)}
        print(f"## default plan {w.plan.to_dict()}\n\n| subject | split | fg-Dice | GDS | PSNR dB | s/slice |\n|---|---|---|---|---|---|")
        for r in rows:
            split = "test" if r["subject"] in sp["test"] else "validation"
            print(f"| {r['subject']} | {split} | {r['fg_dice']:.3f} | {r['gds']:.3f} | {r['psnr']:.1f} | {r['seconds']:.2f} |")
        print()
    if "steps" in a.experiments:
        out["steps"] = []
        print("## test-time steps (batch and learning rates of the card; steps past the trained budget reuse the last rate)\n")
        print("| steps | fg-Dice | GDS | PSNR dB | s/slice |\n|---|---|---|---|---|")
        for k in a.steps_list:
            plan = FitPlan(**{**w.plan.to_dict(), "steps": k})
            s = summary(run(net, w.log_lr, plan, subjects, a.data, w.canvas))
            out["steps"].append({"steps": k, **s})
            print(f"| {k} | {s['fg_dice']:.3f} ± {s['fg_sd']:.3f} | {s['gds']:.3f} | {s['psnr']:.1f} | {s['seconds']:.2f} |")
        print()
    if "paper" in a.experiments:
        plan = FitPlan(steps=100, batch_size=10**9, bg_weight=w.plan.bg_weight)
        lr = torch.full_like(w.log_lr[:1], math.log(1e-4))
        rows = run(net, lr, plan, subjects, a.data, w.canvas)
        s = summary(rows)
        out["paper"] = {"rows": rows, "summary": s}
        print("## paper test-time setting (100 full-batch Adam steps, lr 1e-4) from the same weights\n")
        print(f"fg-Dice {s['fg_dice']:.3f} ± {s['fg_sd']:.3f}, GDS {s['gds']:.3f}, PSNR {s['psnr']:.1f} dB, {s['seconds']:.2f} s/slice\n")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

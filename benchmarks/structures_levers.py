"""Levers on the structures' accuracy and repeatability, measured on the model grid (issue 28).

For each validation subject of a pack (`metaseg prepare --label-set structures`), the weights are fitted with the
test-time plan under several seeds, and the labels are decoded in several ways from the same fits:
- `last`: the fit's last step (what `segment` does);
- `avgK`: the fit's parameters averaged over its last K steps (as SWA does in training; no extra fit);
- `ens`: the probabilities of all seeds' fits averaged (`--quality best`);
- with `--schedule fixed` the fits follow the canvas's fixed sequence of batches (`FixedSchedule`) and each "seed"
  is an ensemble member's place in it (the user's seed plays no part in a fixed fit);
- `+prior a`: any of the above times the spatial prior (metaseg.method.prior, built from the training subjects) to the
  power a, renormalized (a Bayesian prior on the head's output, no retraining).
It reports mean Dice over the 31 structures, hippocampus Dice (L/R mean) and the hippocampal volume's change
between seeds (|dV| %, L+R). Run by hand, e.g.
  .venv/bin/python benchmarks/structures_levers.py --pack pack/structures.npz --weights Resources/Weights/metaseg3d_structures.pt
Appends a JSON record to --json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from metaseg.io.data import load_splits
from metaseg.method.fit import SCHEDULES, FittedINR, FixedSchedule, adapt
from metaseg.labelsets import label_set
from metaseg.metrics import dice_per_class
from metaseg.method.preprocess import grid_coords, normalize_intensity
from metaseg.method.prior import SpatialPrior
from metaseg.method.weights import load_weights

HIPPO = ("Left-Hippocampus", "Right-Hippocampus")


def fit_params(net, log_lr, plan, coords, values, seed: int, avg_last: tuple, batches=None) -> dict:
    """Fitted parameters at the last step and averaged over each of the last K steps in `avg_last`."""
    gen = torch.Generator().manual_seed(seed)
    sums = {k: None for k in avg_last}
    params = {k: p.detach() for k, p in net.named_parameters()}
    last = params
    for step, _, fast in adapt(net, params, coords, values, plan, log_lr, generator=gen, batches=batches):
        for k in avg_last:
            if step > plan.steps - k:
                cur = {n: t.detach().clone() for n, t in fast.items()}
                sums[k] = cur if sums[k] is None else {n: sums[k][n] + cur[n] for n in cur}
        last = fast
    out = {"last": {n: t.detach() for n, t in last.items()}}
    out.update({f"avg{k}": {n: t / k for n, t in sums[k].items()} for k in avg_last})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="pack/structures.npz")
    ap.add_argument("--weights", default="Resources/Weights/metaseg3d_structures.safetensors")
    ap.add_argument("--schedule", default="random", choices=SCHEDULES, help="the fit's batches (FitPlan.schedule)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--subjects", nargs="+", help="these subjects of the split only (default: all)")
    ap.add_argument("--prior-cache", help="keep the training brains' prior in this file (built once, ~3 min)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--avg", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/structures_levers.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = load_weights(Path(a.weights))
    net = w.build()
    labels = label_set(w.card.get("label_set", "structures"))
    lut = np.asarray(labels.index_lut(), np.int16)
    names = [lab.name for lab in labels.labels][1:]
    hip = [names.index(h) for h in HIPPO]
    log_lr = w.log_lr
    plan = w.plan
    splits = load_splits()
    pack = np.load(a.pack)
    t0 = time.time()
    if a.prior_cache and Path(a.prior_cache).is_file():
        prior = SpatialPrior.from_uint8(load_file(a.prior_cache)["prior"])
    else:
        prior = SpatialPrior.build((lut[pack[f"{s}/labels"]] for s in splits["train"]), len(labels))
        if a.prior_cache:
            save_file({"prior": prior.to_uint8()}, a.prior_cache)
    print(f"prior of {len(splits['train'])} training brains: {time.time() - t0:.0f} s", file=sys.stderr)
    subjects = [s for s in splits[a.split] if not a.subjects or s in a.subjects]
    rows = []
    for subj in subjects:
        img = normalize_intensity(pack[f"{subj}/image"].astype(np.float32))
        ref = lut[pack[f"{subj}/labels"]]
        flat = torch.from_numpy(img).reshape(-1)
        idx = torch.nonzero(flat > 0).squeeze(1)
        coords, values = grid_coords(img.shape, idx), flat[idx]
        ref_pts = ref.reshape(-1)[idx.numpy()]
        pri = prior.at(coords)
        image = torch.from_numpy(img)
        probs = {}  # (variant, seed) -> probabilities
        for seed in a.seeds:
            t1 = time.time()
            batches = FixedSchedule.for_plan(dataclasses.replace(plan, schedule=a.schedule), idx, flat.numel(), seed)
            for variant, params in fit_params(net, log_lr, plan, coords, values, seed, tuple(a.avg), batches).items():
                probs[(variant, seed)] = FittedINR(net, params, image=image).probabilities(coords)  # decoding as segment does
            print(f"{subj} seed {seed}: {time.time() - t1:.0f} s", file=sys.stderr)
        variants = sorted({v for v, _ in probs})
        decoded = {}
        for v in variants:
            for seed in a.seeds:
                decoded[(v, seed)] = probs[(v, seed)]
            decoded[(v, "ens")] = sum(probs[(v, s)] for s in a.seeds) / len(a.seeds)
        for (v, seed), p in list(decoded.items()):
            for al in a.alphas:
                q = p * pri.clamp_min(1e-4) ** al
                decoded[(f"{v}+prior{al:g}", seed)] = q / q.sum(1, keepdim=True)
        for (v, seed), p in decoded.items():
            lab = p.argmax(1).numpy()
            dc = dice_per_class(lab, ref_pts, len(labels))
            d = np.array([dc[c] for c in range(1, len(labels))])
            vol = [int((lab == h + 1).sum()) for h in hip]
            rows.append({"subject": subj, "variant": v, "seed": seed, "mean_dice": float(np.nanmean(d)),
                         "hippo_dice": float(np.mean([d[h] for h in hip])), "min_dice": float(np.nanmin(d)),
                         "hippo_ml": sum(vol) / 1000.0})
    # summary per variant: accuracy of single fits, seed-to-seed hippocampal change
    summary = {}
    for v in sorted({r["variant"] for r in rows}):
        single = [r for r in rows if r["variant"] == v and r["seed"] != "ens"]
        ens = [r for r in rows if r["variant"] == v and r["seed"] == "ens"]
        dv = []
        for subj in subjects:
            hv = [r["hippo_ml"] for r in single if r["subject"] == subj]
            dv += [100 * abs(x - y) / ((x + y) / 2) for i, x in enumerate(hv) for y in hv[i + 1 :]]
        summary[v] = {"mean_dice": np.mean([r["mean_dice"] for r in single]), "hippo_dice": np.mean([r["hippo_dice"] for r in single]),
                      "ens_mean_dice": np.mean([r["mean_dice"] for r in ens]), "ens_hippo_dice": np.mean([r["hippo_dice"] for r in ens]),
                      "seed_dV_mean": float(np.mean(dv)), "seed_dV_max": float(np.max(dv))}
        print(f"{v:>16}: single {summary[v]['mean_dice']:.3f} (hippo {summary[v]['hippo_dice']:.3f}), "
              f"ensemble {summary[v]['ens_mean_dice']:.3f} (hippo {summary[v]['ens_hippo_dice']:.3f}), "
              f"hippocampus between seeds |dV| mean {summary[v]['seed_dV_mean']:.1f} % max {summary[v]['seed_dV_max']:.1f} %")
    rec = {"command": " ".join(sys.argv), "weights_sha256": w.sha256, "machine": platform.processor() or platform.machine(),
           "threads": a.threads, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows,
           "summary": {k: {kk: round(float(vv), 4) for kk, vv in s.items()} for k, s in summary.items()}}
    with open(a.json, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

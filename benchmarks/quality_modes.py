"""Does an accuracy mode pay? Ensembles of fits (different seeds) averaged in probability, and longer fits.

Run by hand (not a test), on the validation split only:
  .venv/bin/python benchmarks/quality_modes.py 2d --ensembles 1 3 5 --steps-factor 1 2
  .venv/bin/python benchmarks/quality_modes.py 3d --ensembles 1 3 --subjects ws01 oas1-0040
Prints fg-Dice per subject and mode with the seconds each mode costs; appends JSON to --json.
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
import SimpleITK as sitk
import torch

from metaseg.io.data import PAPER_SLICE, coronal_slices, label_group, load_slice, load_splits, subject_dir
from metaseg.io.readers import image_array_3d, read_image
from metaseg.metrics import foreground_dice
from metaseg.method.preprocess import grid_coords
from metaseg.method.segment import segment_array
from metaseg.runtime import Model
from metaseg.space.volume import VolumeSettings, segment_volume, voxel_points
from metaseg.method.weights import load_weights


def probs_2d(w, net, plan, image, seed):
    r = segment_array(net, w.log_lr, plan, image, w.canvas, seed=seed)
    h, wd = image.shape
    ch, cw = w.canvas
    y0, x0 = (ch - h) // 2, (cw - wd) // 2
    idx = torch.arange(ch * cw).reshape(ch, cw)[y0:y0 + h, x0:x0 + wd].reshape(-1)
    p = r.fitted.probabilities(grid_coords(w.canvas, idx)).numpy().reshape(h, wd, -1)
    return p * (image > 0)[..., None] if plan.foreground_only else p


def probs_3d(w, net, plan, scan, seed):
    res = segment_volume(scan, Model(w, net, next(net.parameters()).device, plan), VolumeSettings(seed=seed))
    arr = image_array_3d(scan)
    flat = np.flatnonzero(arr.reshape(-1) > 0)
    p = np.zeros((arr.size, 5), np.float32)
    p[:, 0] = 1.0
    p[flat] = res.fitted.query(voxel_points(scan, flat), "probabilities")
    return p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dims", choices=("2d", "3d"))
    ap.add_argument("--weights")
    ap.add_argument("--subjects", nargs="+")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--pack", default="pack/all.npz")
    ap.add_argument("--ensembles", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--steps-factor", type=float, nargs="+", default=[1.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/quality_modes.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    w = load_weights(Path(a.weights or f"Resources/Weights/metaseg{a.dims}.safetensors"))
    net = w.build()
    subjects = a.subjects or load_splits()["validation"]
    rows = []
    for s in subjects:
        d = subject_dir(Path(a.data), s)
        if a.dims == "2d":
            sl = load_slice(d) if (d / "slice_norm.nii.gz").is_file() else coronal_slices(Path(a.pack) / s, [PAPER_SLICE])[0]
            image, ref, run = sl.image, sl.labels, probs_2d
        else:
            image = read_image(d / "native_t1.nii.gz")
            ref, run = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "native_seg4.nii.gz"))).reshape(-1), probs_3d
        for f in a.steps_factor:
            plan = dataclasses.replace(w.plan, steps=int(round(w.plan.steps * f)))
            acc, t = None, 0.0
            for k in range(max(a.ensembles)):
                t0 = time.perf_counter()
                p = run(w, net, plan, image, seed=k)
                t += time.perf_counter() - t0
                acc = p if acc is None else acc + p
                if k + 1 in a.ensembles:
                    lab = acc.argmax(-1).astype(np.uint8)
                    row = {"subject": s, "group": label_group(d), "steps": plan.steps, "fits": k + 1,
                           "fg_dice": round(foreground_dice(lab.reshape(ref.shape), ref), 4), "seconds": round(t, 1)}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    print("| steps | fits | mean fg-Dice | freesurfer | manual | s per image |\n| --- | --- | --- | --- | --- | --- |")
    for key in sorted({(r["steps"], r["fits"]) for r in rows}):
        sel = [r for r in rows if (r["steps"], r["fits"]) == key]
        by = {g: np.mean([r["fg_dice"] for r in sel if r["group"] == g]) for g in ("freesurfer", "manual")}
        print(f"| {key[0]} | {key[1]} | {np.mean([r['fg_dice'] for r in sel]):.4f} | {by['freesurfer']:.4f} | "
              f"{by['manual']:.4f} | {np.mean([r['seconds'] for r in sel]):.1f} |")
    with open(a.json, "a") as f:
        f.write(json.dumps({"dims": a.dims, "sha256": w.sha256, "rows": rows, "command": " ".join(sys.argv),
                            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                            "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

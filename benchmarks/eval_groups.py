"""Accuracy per label-protocol group: per-class Dice and volume error of 3D native scans or 2D slices.

Run by hand (not a test), e.g. on the 2-core CPU:
  .venv/bin/python benchmarks/eval_groups.py 3d --split validation --weights Resources/Weights/metaseg3d.safetensors
  .venv/bin/python benchmarks/eval_groups.py 2d --split test --pack pack/all.npz
  .venv/bin/python benchmarks/eval_groups.py 3d --labels structures --weights Resources/Weights/metaseg3d_structures.safetensors
3D: each subject's `native_t1.nii.gz` (scanner geometry, registered automatically) through
`segment_volume`, scored against `native_seg4.nii.gz` on the scan's own voxels.
2D: slice 109 of the aligned volume: `slice_norm` for the FreeSurfer subjects (the paper's task file),
the subject's coronal slice 109 in a `metaseg prepare` pack for the OASIS subjects (they have no
aligned files). Subjects come from `metaseg/splits.json`; both label groups are reported separately
(FreeSurfer: brains/, manual Neuromorphometrics: oasis-nmm/). Appends a JSON record to --json.
With `--labels structures` the reference is `native_structures.nii.gz` (3D) or slice 109 of a structures
pack (2D, both groups: `metaseg prepare --label-set structures`); every structure gets its Dice and volume
error, and the structures merged into the 4 tissues are scored against the tissue labels too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from metaseg.io.data import PAPER_SLICE, coronal_slices, label_group, load_slice, load_splits, subject_dir
from metaseg.io.readers import read_image
from metaseg.labelsets import STRUCTURES, TISSUES, LabelSet, label_set
from metaseg.evaluate import score
from metaseg.metrics import foreground_dice
from metaseg.method.fit import SCHEDULES
from metaseg.method.segment import segment_array
from metaseg.runtime import Model
from metaseg.space.volume import VolumeSettings, segment_volume
from metaseg.method.weights import load_weights
from metaseg.resources import default_weights

CLASSES = {1: "cortex", 2: "subcortical", 3: "wm", 4: "csf"}


def scores(pred: np.ndarray, ref: np.ndarray, voxel_ml: float, labels: LabelSet = TISSUES) -> dict:
    """`metaseg evaluate`'s scores (evaluate.score) as this benchmark's flat record: fg-Dice, Dice and absolute
    volume error (%) per label; for structures also the lowest structure, the hippocampus (L/R mean) and the
    structures merged into tissues against the reference merged likewise."""
    s = score(pred, ref, labels, voxel_ml)
    out = {"fg_dice": round(s["fg_dice"], 4)}
    for lab in labels.labels[1:]:
        name = CLASSES[lab.value] if labels is TISSUES else lab.name
        err = s["volume_error_pct"][lab.name]
        out[f"dice_{name}"] = round(s["dice"][lab.name], 4)
        out[f"volerr_{name}_pct"] = None if np.isnan(err) else round(err, 1)
    if labels is not TISSUES:  # the figures a clinic reads
        present = [d for d in s["dice"].values() if not np.isnan(d)]
        out["min_structure_dice"] = round(min(present), 4)
        out["dice_hippocampus"] = round((out["dice_Left-Hippocampus"] + out["dice_Right-Hippocampus"]) / 2, 4)
        out["tissue_fg_dice_vs_merged_ref"] = round(s["tissue_fg_dice"], 4)
    return out


def tissue_scores(pred_values: np.ndarray, tissue_ref: np.ndarray, labels: LabelSet) -> dict:
    """Structures merged into the 4 tissue classes, scored against the tissue labels."""
    merged = np.asarray(labels.tissue_lut(), np.uint8)[pred_values]
    return {"tissue_fg_dice": round(foreground_dice(merged, tissue_ref), 4)}


def eval_3d(w, net, subject: str, data: Path, seed: int, labels: LabelSet, plan, fits: int = 1,
            save: Optional[Path] = None) -> dict:
    d = subject_dir(data, subject)
    img = read_image(d / "native_t1.nii.gz")
    ref_name = "native_seg4.nii.gz" if labels is TISSUES else "native_structures.nii.gz"
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(d / ref_name)))
    t0 = time.perf_counter()
    res = segment_volume(img, Model(w, net, next(net.parameters()).device, plan), VolumeSettings(seed=seed, fits=fits))
    dt = time.perf_counter() - t0
    pred = sitk.GetArrayFromImage(res.labels)
    if save is not None:  # the labels, for studies that need no new fit (e.g. post-processing)
        save.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(res.labels, str(save / f"{subject}.nii.gz"), True)
    row = scores(pred, ref, float(np.prod(img.GetSpacing())) / 1000.0, labels)
    if labels is not TISSUES:
        row.update(tissue_scores(pred, sitk.GetArrayFromImage(sitk.ReadImage(str(d / "native_seg4.nii.gz"))), labels))
    return {**row, "ncc": round(res.registration["ncc"], 3), "ncc_interior": round(res.registration["ncc_interior"], 3),
            "psnr": round(res.psnr, 2), "seconds": round(dt, 1), "warnings": res.warnings}


def eval_2d(w, net, subject: str, data: Path, pack: Path, seed: int, labels: LabelSet) -> dict:
    d = subject_dir(data, subject)
    if labels is TISSUES and (d / "slice_norm.nii.gz").is_file():
        sl = load_slice(d)
    else:
        sl = coronal_slices(pack / subject, [PAPER_SLICE])[0]
        if labels is TISSUES and sl.labels.max() > max(TISSUES.values):  # a structures pack: its tissues, merged
            sl = dataclasses.replace(sl, labels=np.asarray(STRUCTURES.tissue_lut(), np.uint8)[sl.labels])
    t0 = time.perf_counter()
    res = segment_array(net, w.log_lr, w.plan, sl.image, w.canvas, seed=seed)
    dt = time.perf_counter() - t0
    row = scores(res.labels, sl.labels, 0.001, labels)
    return {**row, "psnr": round(res.psnr, 2), "seconds": round(dt, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dims", choices=("2d", "3d"))
    ap.add_argument("--weights", help="default: the shipped weights of --labels")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--subjects", nargs="+", help="instead of --split")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--pack", default="pack/all.npz", help="2D: `metaseg prepare` pack with the OASIS subjects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/eval_groups.json")
    ap.add_argument("--label", default="", help="a name for this record (e.g. 'old weights')")
    ap.add_argument("--labels", default="tissues", choices=("tissues", "structures"),
                    help="the label set to score (a structures model's classes are summed into the tissues)")
    ap.add_argument("--schedule", choices=SCHEDULES, help="3D: the fit's batches (default: the weights' card)")
    ap.add_argument("--fits", type=int, default=1, help="3D: fits averaged per scan (--quality best: 3)")
    ap.add_argument("--save", type=Path, help="3D: write each scan's labels to SAVE/<subject>.nii.gz")
    a = ap.parse_args()
    labels = label_set(a.labels)
    torch.set_num_threads(a.threads)
    w = load_weights(Path(a.weights) if a.weights else default_weights(int(a.dims[0]), a.labels))
    net = w.build(labels=a.labels)  # a structures model labels tissues with its classes summed into them
    subjects = a.subjects or load_splits()[a.split]
    rows = []
    for s in subjects:
        plan = dataclasses.replace(w.plan, schedule=a.schedule) if a.schedule else w.plan
        r = eval_3d(w, net, s, Path(a.data), a.seed, labels, plan, a.fits, a.save) if a.dims == "3d" \
            else eval_2d(w, net, s, Path(a.data), Path(a.pack), a.seed, labels)
        r = {"subject": s, "group": label_group(subject_dir(Path(a.data), s)), **r}
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    names = list(CLASSES.values()) if labels is TISSUES else [lab.name for lab in labels.labels[1:]]
    extra = [k for k in ("min_structure_dice", "dice_hippocampus", "tissue_fg_dice", "tissue_fg_dice_vs_merged_ref")
             if k in rows[0]]
    keys = ["fg_dice"] + extra + [f"dice_{n}" for n in names] + [f"volerr_{n}_pct" for n in names]
    groups = {}
    for g in sorted({r["group"] for r in rows}):
        sel = [r for r in rows if r["group"] == g]
        groups[g] = {k: round(float(np.nanmean([r[k] for r in sel if r[k] is not None] or [np.nan])), 4) for k in keys}
        groups[g]["min_fg_dice"] = min(r["fg_dice"] for r in sel)
        groups[g]["n"] = len(sel)
    print(f"# {a.dims} {a.split if not a.subjects else 'subjects'} — {w.sha256[:12]} {a.label}")
    cols = ["subject", "group"] + keys + (["ncc_interior", "seconds"] if a.dims == "3d" else ["seconds"])
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    for g, v in groups.items():
        print(f"| **mean {g}** (n={v['n']}) | | " + " | ".join(str(v[k]) for k in keys) + " |  |" + (" |" if a.dims == "3d" else ""))
    rec = {"dims": a.dims, "labels": a.labels, "split": a.split, "subjects": subjects, "weights": a.weights, "sha256": w.sha256, "label": a.label,
           "schedule": a.schedule or "card", "fits": a.fits, "rows": rows, "groups": groups, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "command": "benchmarks/eval_groups.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(a.json, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

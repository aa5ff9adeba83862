"""3D benchmark: Dice, time and memory of whole-volume segmentation on the 2-core CPU (or a GPU).

Run by hand (not a test), one experiment per process so that peak memory is the experiment's own:
  .venv/bin/python benchmarks/bench_3d.py aligned   # aligned_norm volumes (the training grid), full resolution
  .venv/bin/python benchmarks/bench_3d.py native    # native_t1 .nii.gz and .mgz in scanner geometry (issue 4)
  .venv/bin/python benchmarks/bench_3d.py rotated   # native scans rotated 15 deg and shifted 8 mm vs the original
  .venv/bin/python benchmarks/bench_3d.py planes    # cross-sections of the fitted INR vs reference labels on the planes
  .venv/bin/python benchmarks/bench_3d.py paper     # the paper's setting: s/step of 3->256x4 SIREN, full batch 80x80x100
Each prints a markdown table and appends a JSON record to --json (default docs/bench_3d.json).
Subjects: the validation split (ws01, ecog) unless --subjects; never tuned on the test subject.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from metaseg.io.data import load_splits
from metaseg.space.geometry import centred_affine
from metaseg.io.readers import read_image
from metaseg.metrics import foreground_dice, generalized_dice
from metaseg.space.reslice import reslice, standard_plane
from metaseg.runtime import Model
from metaseg.space.volume import segment_volume
from metaseg.method.weights import load_weights

DATA = Path("../shared/data/brains")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB


def seg(w, net, img):
    t0 = time.perf_counter()
    res = segment_volume(img, Model(w, net, next(net.parameters()).device, w.plan))
    return res, time.perf_counter() - t0


def score(res, ref_path) -> dict:
    lab = sitk.GetArrayFromImage(res.labels)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))
    return {"fg_dice": round(foreground_dice(lab, ref), 4), "gds": round(generalized_dice(lab, ref), 4)}


def rotated_copy(img: sitk.Image, angles=(15.0, 0.0, 0.0), shift=(8.0, 0.0, 0.0), interp=sitk.sitkLinear) -> sitk.Image:
    """The same head rotated and shifted inside the same grid (a differently positioned acquisition)."""
    t = centred_affine(img, img, angles, shift)
    return sitk.Resample(img, img, t, interp, 0.0, img.GetPixelID())


def exp_aligned(w, net, subjects):
    rows = []
    for s in subjects:
        res, dt = seg(w, net, read_image(DATA / s / "aligned_norm.nii.gz"))
        rows.append({"subject": s, **score(res, DATA / s / "aligned_seg4.nii.gz"), "psnr": round(res.psnr, 2),
                     "seconds": round(dt, 1), **{k: round(v, 1) for k, v in res.timings.items()}})
    return rows


def exp_native(w, net, subjects):
    rows = []
    for s in subjects:
        for f in ("native_t1.nii.gz", "native_t1.mgz"):
            res, dt = seg(w, net, read_image(DATA / s / f))
            rows.append({"subject": s, "file": f, **score(res, DATA / s / "native_seg4.nii.gz"),
                         "ncc": round(res.registration["ncc"], 3), "registration_ok": res.registration["ok"],
                         "psnr": round(res.psnr, 2), "seconds": round(dt, 1), "warnings": res.warnings,
                         **{k: round(v, 1) for k, v in res.timings.items()}})
    return rows


def exp_rotated(w, net, subjects):
    rows = []
    for s in subjects:
        img = read_image(DATA / s / "native_t1.nii.gz")
        ref = sitk.ReadImage(str(DATA / s / "native_seg4.nii.gz"))
        base, _ = seg(w, net, img)
        moved_img = rotated_copy(img)
        moved_ref = rotated_copy(ref, interp=sitk.sitkNearestNeighbor)
        moved, dt = seg(w, net, moved_img)
        a = foreground_dice(sitk.GetArrayFromImage(base.labels), sitk.GetArrayFromImage(ref))
        b = foreground_dice(sitk.GetArrayFromImage(moved.labels), sitk.GetArrayFromImage(moved_ref))
        rows.append({"subject": s, "fg_dice_original": round(a, 4), "fg_dice_rotated_shifted": round(b, 4),
                     "difference": round(b - a, 4), "ncc_rotated": round(moved.registration["ncc"], 3)})
    return rows


PLANES = [("axial", (0, 0, 0)), ("coronal", (0, 0, 0)), ("sagittal", (0, 0, 0)), ("axial", (25, 15, 0)),
          ("coronal", (20, 0, 30))]


def exp_planes(w, net, subjects, spacing=1.0):
    """Labels of the fitted INR on planes through the scan's centre vs the reference labels on the same planes."""
    rows = []
    for s in subjects:
        img = read_image(DATA / s / "native_t1.nii.gz")
        ref = sitk.ReadImage(str(DATA / s / "native_seg4.nii.gz"))
        res, _ = seg(w, net, img)
        for orient, angles in PLANES:
            plane = standard_plane(res.fitted.info["reference"], orient, spacing, angles, extent_mm=200)
            got = reslice(res.fitted, plane)
            want = sitk.Resample(ref, got, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            rows.append({"subject": s, "plane": orient if angles == (0, 0, 0) else f"oblique {orient} {angles}",
                         "fg_dice": round(foreground_dice(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want)), 4)})
    return rows


def exp_paper(steps=3):
    """Seconds per full-batch Adam step of the paper's 3D network on its 80x80x100 grid (extrapolated to 300)."""
    from metaseg.method.config import PAPER_3D
    from metaseg.method.fit import FitPlan, adapt
    from metaseg.method.model import MetaSegNet
    from metaseg.method.preprocess import grid_coords

    net = MetaSegNet(PAPER_3D)
    coords = grid_coords((100, 80, 80))
    values = torch.rand(coords.shape[0])
    lr = torch.full((1, len(net.inr_parameter_names())), math.log(1e-4))
    params = {k: p.detach() for k, p in net.named_parameters()}
    t0 = time.perf_counter()
    for _ in adapt(net, params, coords, values, FitPlan(steps=steps, batch_size=coords.shape[0]), lr):
        pass
    per = (time.perf_counter() - t0) / steps
    return [{"setting": "paper: SIREN 3->256 x4, 300 full-batch steps on 80x80x100", "seconds_per_step": round(per, 2),
             "measured_steps": steps, "seconds_300_steps_extrapolated": round(300 * per, 0)}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment", choices=("aligned", "native", "rotated", "planes", "paper"))
    ap.add_argument("--weights", default="Resources/Weights/metaseg3d.safetensors")
    ap.add_argument("--subjects", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/bench_3d.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    subjects = a.subjects or load_splits()["validation"]
    t0 = time.time()
    if a.experiment == "paper":
        rows = exp_paper()
        w = None
    else:
        w = load_weights(Path(a.weights))
        net = w.build(torch.device(a.device))
        rows = {"aligned": exp_aligned, "native": exp_native, "rotated": exp_rotated, "planes": exp_planes}[a.experiment](w, net, subjects)
    rec = {"experiment": a.experiment, "rows": rows, "weights_sha256": w.sha256 if w else None,
           "steps": w.plan.steps if w else None, "peak_rss_gb": round(peak_rss_gb(), 2),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
           "device": a.device, "torch": torch.__version__, "minutes": round((time.time() - t0) / 60, 1),
           "command": f"benchmarks/bench_3d.py {a.experiment}", "date": time.strftime("%Y-%m-%d")}
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    print(f"peak RSS {rec['peak_rss_gb']} GB, {rec['minutes']} min")
    with open(a.json, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

"""Repeat-scan agreement: per-class tissue volumes of the same brain scanned "again" (issue 16).

Real test-retest pairs are not in our data, so the repeats are built from one scan, each a change a
second session really brings:
  - re-positioned: the head rotated by a few degrees and shifted by a few mm inside the same grid;
  - re-sliced: the scan resampled onto another grid (oblique by a few degrees, 1.2 mm through-plane);
  - noise + bias: Gaussian noise at a realistic SNR and a smooth multiplicative bias field, in the brain only
    (the input is skull-stripped: its background stays 0);
  - seeds: the very same scan fitted with seeds 0..4 (the fit's own variation, the floor of the others).
Each run segments the whole scan as `metaseg segment` does (registration, fit, labels on the scan's own grid)
and measures each class's volume in mL on that grid; the figure is |V - V_ref| / V_ref in % against seed 0
on the original scan.

Run by hand (not a test; about 12 segmentations, ~1-2 min each on one CPU thread):
  .venv/bin/python benchmarks/repeat_scans.py --threads 1            # the bundled sample (ecog)
  .venv/bin/python benchmarks/repeat_scans.py --scan ../shared/data/brains/ws01/native_t1.nii.gz --threads 1
Prints markdown tables and appends one JSON record to --json (default docs/repeat_scans.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk
import torch

from metaseg.space.geometry import centred_affine, oblique_direction
from metaseg.io.readers import read_image
from metaseg.runtime import Model
from metaseg.space.volume import VolumeSettings, segment_volume
from metaseg.method.weights import load_weights

CLASSES = {1: "cortical GM", 2: "subcortical GM", 3: "WM", 4: "CSF"}


def repositioned(img: sitk.Image, angles, shift_mm) -> sitk.Image:
    """The same head rotated and shifted inside the same grid (a differently positioned acquisition)."""
    t = centred_affine(img, img, angles, shift_mm)
    return _masked(img, img, t)


def resliced(img: sitk.Image, angles, spacing) -> sitk.Image:
    """The same head sampled on another grid: oblique by `angles`, voxels of `spacing` mm, same centre."""
    size = [int(round(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(s) for s in spacing))
    ref.SetDirection(oblique_direction(angles))
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in img.GetSize()]))
    half = np.array(ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in size]))
    ref.SetOrigin(tuple(centre - half))
    return _masked(img, ref, sitk.Transform())


def _masked(img: sitk.Image, ref: sitk.Image, t: sitk.Transform) -> sitk.Image:
    """`img` resampled onto `ref` (linear), zero outside its brain mask resampled the same way (>= 0.5): the
    repeat scan is skull-stripped too, with a mask of the same brain, not a blurred rim of partial voxels."""
    out = sitk.Resample(img, ref, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = sitk.Resample(sitk.Cast(img > 0, sitk.sitkFloat32), ref, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Mask(out, mask >= 0.5)


def noisy(img: sitk.Image, sigma_rel: float, bias: float, seed: int) -> sitk.Image:
    """Gaussian noise of `sigma_rel` x the brain's 99th percentile and a smooth bias field exp(+-bias) over the
    field of view, both inside the brain only (background stays 0, as in a skull-stripped scan)."""
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    brain = arr > 0
    rng = np.random.default_rng(seed)
    hi = float(np.percentile(arr[brain], 99))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in arr.shape], indexing="ij")
    c = rng.uniform(-1, 1, 3).astype(np.float32)
    field = np.exp(bias * (c[0] * x + c[1] * y + c[2] * z) / np.abs(c).sum())
    out = arr * field + rng.normal(0.0, sigma_rel * hi, arr.shape).astype(np.float32)
    out = np.where(brain, np.clip(out, 1e-3, None), 0).astype(np.float32)
    res = sitk.GetImageFromArray(out)
    res.CopyInformation(img)
    return res


def volumes_ml(labels: sitk.Image) -> Dict[int, float]:
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=5)
    cell = float(np.prod(labels.GetSpacing())) / 1000.0
    return {c: float(counts[c]) * cell for c in CLASSES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scan", default="Resources/Sample/ecog_t1.nii.gz")
    ap.add_argument("--weights", default="Resources/Weights/metaseg3d.safetensors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fits", type=int, default=1, help="fits averaged per scan (3: --quality best)")
    ap.add_argument("--bias-correction", action="store_true", help="N4 before every fit (--bias-correction on)")
    ap.add_argument("--kinds", default="seeds,geometry,noise",
                    help="which repeats: seeds (the original scan, --seeds seeds), geometry (re-positioned, "
                    "re-sliced), noise (noise and bias, together and alone); seed 0 on the original always runs")
    ap.add_argument("--json", default="docs/repeat_scans.json")
    a = ap.parse_args()
    kinds = set(a.kinds.split(","))
    torch.set_num_threads(a.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(a.threads)
    w = load_weights(Path(a.weights))
    net = w.build()
    scan = read_image(Path(a.scan))
    seeds = a.seeds if "seeds" in kinds else 1
    runs = [(f"original, seed {s}", lambda: scan, s) for s in range(seeds)]
    if "geometry" in kinds:
        runs += [
            ("repositioned: 3 deg about L-R, 2 mm shift", lambda: repositioned(scan, (3, 0, 0), (2, 0, 0)), 0),
            ("repositioned: 5 deg about S-I, 1 deg about A-P, 3 mm shift", lambda: repositioned(scan, (0, 1, 5), (0, 3, 1)), 0),
            ("re-sliced: 4 deg oblique grid, 1 x 1 x 1.2 mm", lambda: resliced(scan, (4, 0, 2), (1.0, 1.0, 1.2)), 0),
        ]
    if "noise" in kinds:
        runs += [
            ("noise 2% + bias +-10%", lambda: noisy(scan, 0.02, 0.10, 1), 0),
            ("noise 4% + bias +-20%", lambda: noisy(scan, 0.04, 0.20, 2), 0),
            ("noise 4% alone", lambda: noisy(scan, 0.04, 0.0, 2), 0),
            ("bias +-20% alone", lambda: noisy(scan, 0.0, 0.20, 2), 0),
        ]
    rows: List[dict] = []
    t_all = time.time()
    for name, make, seed in runs:
        t0 = time.perf_counter()
        res = segment_volume(make(), Model(w, net, next(net.parameters()).device, w.plan),
                             VolumeSettings(seed=seed, fits=a.fits, bias_correction=a.bias_correction))
        vol = volumes_ml(res.labels)
        rows.append({"run": name, "seed": seed, "volumes_ml": {CLASSES[c]: round(v, 2) for c, v in vol.items()},
                     "ncc": round(res.registration["ncc"], 3) if res.registration else None,
                     "psnr": round(res.psnr, 2), "warnings": res.warnings, "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    ref = rows[0]["volumes_ml"]
    for r in rows:
        r["diff_pct"] = {k: round(100.0 * abs(v - ref[k]) / ref[k], 2) for k, v in r["volumes_ml"].items()}
    per_seed = np.array([[r["volumes_ml"][k] for k in CLASSES.values()] for r in rows[:seeds]])
    seed_cv = (dict(zip(CLASSES.values(), (100 * per_seed.std(0, ddof=1) / per_seed.mean(0)).round(2).tolist()))
               if seeds > 1 else None)
    print("\n| run | " + " | ".join(f"{k} mL (diff %)" for k in CLASSES.values()) + " |\n|" + " --- |" * (len(CLASSES) + 1))
    for r in rows:
        print(f"| {r['run']} | " + " | ".join(f"{r['volumes_ml'][k]:.1f} ({r['diff_pct'][k]:.2f})" for k in CLASSES.values()) + " |")
    print(f"\nseed-to-seed coefficient of variation (%): {seed_cv}")
    rec = {"scan": a.scan, "rows": rows, "seed_cv_pct": seed_cv, "weights_sha256": w.sha256, "steps": w.plan.steps,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)", "torch": torch.__version__,
           "minutes": round((time.time() - t_all) / 60, 1), "date": time.strftime("%Y-%m-%d"),
           "command": "benchmarks/repeat_scans.py " + " ".join(sys.argv[1:])}
    with open(a.json, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

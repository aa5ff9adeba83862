"""Flip rate: the share of brain voxels whose label changes when the input changes by far less than a voxel
(issue 22), and the tissue volume change it causes.

Per subject, each run segments the whole scan as `metaseg segment` does (registration, fit, labels on the
scan's grid), seed 0 unless said otherwise:
  - reference: the scan as it is;
  - seed 1: the same scan, another fit seed (the fit's own variation);
  - registration jitter: the registration's transform composed with a rigid jitter of 0.25 mm and 0.25 deg
    about a random axis (what a registration change of that size does: about 8 % of the labels in 0.3.1);
  - re-positioned: the same voxels under a header moved by 0.25 mm / 0.25 deg (registration runs again);
  - re-sliced: the scan resampled (linear) onto its grid shifted by half a voxel along every axis;
  - noise 2 %: Gaussian noise of 2 % of the brain's 99th percentile in the brain.
Every run's fitted network is queried at the same anatomical points: a fixed random sample of the original
scan's brain voxels (mapped through the header jitter where there is one), so runs on other grids compare
without resampling a label image. Flip rate = share of those points labelled as brain by either run whose
label differs from the reference's. Dice against the subject's reference labels (native_seg4) is measured
on the same points. Decoders compared on the same fits: argmax at the point ("argmax", what `segment` does)
and class probabilities averaged over the point and its 6 neighbours at +-R mm ("smooth R").

Run by hand (not a test; ~6 segmentations per subject, 1-2 min each on 2 CPU threads):
  PYTHONPATH=MetaSegCore .venv/bin/python benchmarks/flip_rate.py --subjects ws01 oas1-0040 --threads 2
Validation subjects only (metaseg/splits.json); prints a markdown table, appends a JSON record to --json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

import metaseg.space.volume as volume
from metaseg.io.data import load_splits
from metaseg.io.readers import read_image
from metaseg.space.registration import _as_affine
from metaseg.runtime import Model
from metaseg.space.volume import VolumeSettings, segment_volume, voxel_points
from metaseg.method.weights import load_weights
from metaseg.resources import default_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repeat_scans import CLASSES, noisy, volumes_ml  # noqa: E402

DATA = {"brains": Path("../shared/data/brains"), "oasis-nmm": Path("../shared/data/oasis-nmm")}
POINTS = 300_000  # sampled brain voxels: flip rates to about +-0.1 %
SMOOTH_MM = (0.5, 1.0)


def subject_dir(subject: str, root: Path) -> Path:
    for group in DATA:
        d = root / group / subject
        if d.is_dir():
            return d
    raise SystemExit(f"no data for {subject} under {root}")


def rigid(angle_deg: float, shift_mm: float, rng: np.random.Generator, centre: np.ndarray) -> sitk.AffineTransform:
    """A rotation by `angle_deg` about a random axis through `centre`, then a shift of `shift_mm` in a random direction."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(angle_deg)
    r = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    d = rng.normal(size=3)
    t = sitk.AffineTransform(3)
    t.SetCenter(tuple(float(c) for c in centre))
    t.SetMatrix(tuple(float(v) for v in r.ravel()))
    t.SetTranslation(tuple(float(v) for v in shift_mm * d / np.linalg.norm(d)))
    return t


def with_header_moved(img: sitk.Image, j: sitk.AffineTransform) -> sitk.Image:
    """The same voxels, their physical positions moved by `j` (the head scanned 0.25 mm / deg elsewhere)."""
    out = sitk.Image(img)
    d = np.array(img.GetDirection()).reshape(3, 3)
    m = np.array(j.GetMatrix()).reshape(3, 3)
    out.SetDirection(tuple(float(v) for v in (m @ d).ravel()))
    out.SetOrigin(j.TransformPoint(img.GetOrigin()))
    return out


def half_voxel_resliced(img: sitk.Image) -> sitk.Image:
    """The scan resampled (linear) onto its own grid shifted by half a voxel along every axis, brain mask alike."""
    ref = sitk.Image(img.GetSize(), sitk.sitkFloat32)
    ref.CopyInformation(img)
    ref.SetOrigin(img.TransformContinuousIndexToPhysicalPoint([0.5, 0.5, 0.5]))
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    mask = sitk.Resample(sitk.Cast(img > 0, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Mask(out, mask >= 0.5)


class JitteredRegistration:
    """Within the block, every registration's transform is composed with `jitter` (model -> model)."""

    def __init__(self, jitter: Optional[sitk.Transform]):
        self.jitter, self.original = jitter, volume.register_to_template

    def __enter__(self):
        if self.jitter is not None:
            def jittered(work):
                t, info = self.original(work)
                return _as_affine(sitk.CompositeTransform([t, self.jitter])), info
            volume.register_to_template = jittered

    def __exit__(self, *exc):
        volume.register_to_template = self.original


def decode(fitted, points: np.ndarray, smooth_mm: float = 0.0) -> np.ndarray:
    if smooth_mm <= 0:
        return fitted.query(points, "labels")
    offsets = [np.zeros(3)] + [s * smooth_mm * np.eye(3)[i] for i in range(3) for s in (-1, 1)]
    return sum(fitted.query(points + o, "probabilities") for o in offsets).argmax(1)


def dice(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    out = {}
    for c, name in CLASSES.items():
        x, y = a == c, b == c
        out[name] = float(2 * (x & y).sum() / max(1, x.sum() + y.sum()))
    out["mean"] = float(np.mean(list(out.values())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", nargs="+", default=["ws01", "ecog", "oas1-0040", "oas1-0191"])
    ap.add_argument("--data", default="..", help="folder holding shared/data (default: the worktree's parent)")
    ap.add_argument("--weights", help="default: the shipped 3D weights of the tissues (since 0.7.0 the structures model, "
                    "its classes summed into the tissues)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fits", type=int, default=1, help="fits averaged per scan (3: --quality best)")
    ap.add_argument("--runs", default="seed,regjitter,header,reslice,noise")
    ap.add_argument("--json", default="docs/flip_rate.json")
    a = ap.parse_args()
    validation = set(load_splits()["validation"])
    if not set(a.subjects) <= validation:
        raise SystemExit(f"validation subjects only ({sorted(validation)}); never tune on test subjects")
    torch.set_num_threads(a.threads)
    w = load_weights(Path(a.weights) if a.weights else default_weights(3, "tissues"))
    net = w.build(labels="tissues")
    root = Path(a.data) / "shared" / "data"
    wanted = a.runs.split(",")
    records = []
    t_all = time.time()
    for subject in a.subjects:
        d = subject_dir(subject, root)
        scan = read_image(d / "native_t1.nii.gz")
        truth = sitk.GetArrayFromImage(read_image(d / "native_seg4.nii.gz")).reshape(-1)
        rng = np.random.default_rng(0)
        brain = np.flatnonzero(sitk.GetArrayViewFromImage(scan).reshape(-1) > 0)
        sample = np.sort(rng.choice(brain, min(POINTS, len(brain)), replace=False))
        points = voxel_points(scan, sample)
        centre = np.array(scan.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in scan.GetSize()]))
        jit_reg = rigid(0.25, 0.25, rng, np.zeros(3))  # the model grid is centred on 0
        jit_head = rigid(0.25, 0.25, rng, centre)
        runs: List[tuple] = [("reference", lambda: scan, 0, None, points)]
        if "seed" in wanted:
            runs.append(("seed 1", lambda: scan, 1, None, points))
        if "regjitter" in wanted:
            runs.append(("registration jitter 0.25 mm / 0.25 deg", lambda: scan, 0, jit_reg, points))
        if "header" in wanted:
            moved = np.array([jit_head.TransformPoint(tuple(p)) for p in points])
            runs.append(("re-positioned 0.25 mm / 0.25 deg", lambda: with_header_moved(scan, jit_head), 0, None, moved))
        if "reslice" in wanted:
            runs.append(("re-sliced, half-voxel shift", lambda: half_voxel_resliced(scan), 0, None, points))
        if "noise" in wanted:
            runs.append(("noise 2 %", lambda: noisy(scan, 0.02, 0.0, 1), 0, None, points))
        ref: Dict[str, np.ndarray] = {}
        ref_vol = None
        for name, make, seed, jitter, pts in runs:
            t0 = time.perf_counter()
            with JitteredRegistration(jitter):
                res = segment_volume(make(), Model(w, net, torch.device("cpu"), w.plan), VolumeSettings(seed=seed, fits=a.fits))
            members = res.fitted if a.fits == 1 else None
            vol = volumes_ml(res.labels)
            ref_vol = ref_vol or vol
            row = {"subject": subject, "run": name, "fits": a.fits, "seconds": round(time.perf_counter() - t0, 1),
                   "volumes_ml": {CLASSES[c]: round(v, 2) for c, v in vol.items()},
                   "volume_change_pct": {CLASSES[c]: round(100 * (vol[c] - ref_vol[c]) / ref_vol[c], 2) for c in CLASSES},
                   "ncc": round(res.registration["ncc"], 4), "flip_pct": {}, "dice": {}}
            decoders = {"argmax": 0.0, **{f"smooth {r:g} mm": r for r in SMOOTH_MM}} if members is not None else {}
            labels_at = {k: decode(members, pts, r) for k, r in decoders.items()}
            if members is None:  # an ensemble: the labels of the scan's own grid at the sampled voxels
                labels_at = {"argmax": sitk.GetArrayViewFromImage(res.labels).reshape(-1)[sample]} if name != "re-sliced, half-voxel shift" else {}
            for k, lab in labels_at.items():
                if name == "reference":
                    ref[k] = lab
                either = (lab > 0) | (ref[k] > 0)
                row["flip_pct"][k] = round(100 * float((lab[either] != ref[k][either]).mean()), 3)
                row["dice"][k] = round(dice(lab, truth[sample])["mean"], 4)
            records.append(row)
            print(json.dumps(row), flush=True)
    print("\n| subject | run | flip % (argmax / smooth 0.5 / smooth 1.0) | mean Dice (same) | volume change % (" +
          ", ".join(CLASSES.values()) + ") |\n| --- | --- | --- | --- | --- |")
    for r in records:
        print(f"| {r['subject']} | {r['run']} | " + " / ".join(f"{v:.2f}" for v in r["flip_pct"].values()) + " | " +
              " / ".join(f"{v:.4f}" for v in r["dice"].values()) + " | " +
              ", ".join(f"{v:+.2f}" for v in r["volume_change_pct"].values()) + " |")
    rec = {"rows": records, "weights_sha256": w.sha256, "steps": w.plan.steps, "points": POINTS,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)", "torch": torch.__version__,
           "minutes": round((time.time() - t_all) / 60, 1), "date": time.strftime("%Y-%m-%d"),
           "command": "benchmarks/flip_rate.py " + " ".join(sys.argv[1:])}
    with open(a.json, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

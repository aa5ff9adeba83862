"""Figures behind metaseg/space/image_quality.py (issue 26): the tissue-contrast gate on clean and degraded scans.

  OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/exploration/quality_gate_calibration.py [--out F.json]
Segments (as `metaseg segment` does, shipped 3D tissue weights, seed 0, one torch thread) clean scans: the bundled
sample as a skull-stripped scan and as a whole head (deepbet + N4), and native scans of training and validation
subjects of both label groups (never test subjects); then degraded copies of the sample: motion ghosting (3 copies
at 25 % shifted 24, 36, 48 mm along the anterior-posterior axis, wrapped in the field of view), strong noise
(Gaussian, sigma 10 % of the brain's 99th percentile, inside the brain) and strong bias fields (x0.4..x1.6 across
the field of view, on the skull-stripped scan where auto runs no N4, and on the head where N4 runs). Prints and
records each run's image_quality figures, tissue volumes and warnings.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import SimpleITK as sitk
import torch

import metaseg

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Sample"
DATA = ROOT.parent / "shared" / "data"
CLEAN_SUBJECTS = ["sub-01", "oas1-0113", "ws01", "oas1-0040"]  # train FS, train manual (oldest), validation both


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(ref)
    return out


def ghosts(img: sitk.Image, shifts_mm=(24.0, 36.0, 48.0), weight: float = 0.25) -> sitk.Image:
    """`img` plus shifted copies of itself along its anterior-posterior voxel axis (wrapped): motion ghosts."""
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    d = np.array(img.GetDirection()).reshape(3, 3)
    axis_xyz = int(np.argmax(np.abs(d[1])))  # the voxel axis most along LPS y (anterior-posterior)
    axis = 2 - axis_xyz  # numpy (z, y, x) order
    out = a.copy()
    for s in shifts_mm:
        out += weight * np.roll(a, int(round(s / img.GetSpacing()[axis_xyz])), axis=axis)
    return _like(out, img)


def noise(img: sitk.Image, sigma: float = 0.10) -> sitk.Image:
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    brain = a > 0
    scale = float(np.percentile(a[brain], 99))
    rng = np.random.default_rng(0)
    a[brain] = np.maximum(a[brain] + rng.normal(0, sigma * scale, int(brain.sum())), 1e-3)
    return _like(a, img)


def bias(img: sitk.Image, low: float = 0.4, high: float = 1.6) -> sitk.Image:
    """A smooth multiplicative field from `low` to `high` along the diagonal of the field of view."""
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in a.shape], indexing="ij")
    field = low + (high - low) * (x + y + z) / 3.0
    return _like(a * field, img)


def cases() -> List[Tuple[str, str, Callable[[], sitk.Image]]]:
    t1 = lambda: sitk.ReadImage(str(SAMPLE / "ecog_t1.nii.gz"), sitk.sitkFloat32)  # noqa: E731
    head = lambda: sitk.ReadImage(str(SAMPLE / "ecog_head.nii.gz"), sitk.sitkFloat32)  # noqa: E731
    out = [("clean", "sample ecog_t1", t1), ("clean", "sample ecog_head", head)]
    for s in CLEAN_SUBJECTS:
        d = DATA / ("brains" if (DATA / "brains" / s).is_dir() else "oasis-nmm") / s
        out.append(("clean", s, lambda d=d: sitk.ReadImage(str(d / "native_t1.nii.gz"), sitk.sitkFloat32)))
    out += [("degraded", "ecog_t1 ghosts 3x25%", lambda: ghosts(t1())),
            ("degraded", "ecog_head ghosts 3x25%", lambda: ghosts(head())),
            ("degraded", "ecog_t1 noise 10%", lambda: noise(t1())),
            ("degraded", "ecog_t1 bias x0.4-1.6", lambda: bias(t1())),
            ("degraded", "ecog_head bias x0.4-1.6 (N4)", lambda: bias(head()))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality_gate.json"))
    ap.add_argument("--only", nargs="*", help="names of cases to run (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    segmenter = metaseg.Segmenter(device="cpu")
    records: Dict[str, Dict] = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    for kind, name, make in cases():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        seg = segmenter(make(), seed=0)
        rec = {"kind": kind, "image_quality": seg.report["image_quality"], "volumes_ml": seg.volumes,
               "registration": {k: seg.report["registration"][k] for k in ("ncc", "ncc_interior")},
               "warnings": seg.warnings, "seconds": round(time.perf_counter() - t0, 1)}
        records[name] = rec
        Path(a.out).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        print(f"{kind:<9} {name:<30} {json.dumps(rec['image_quality'])} "
              f"WM {seg.volumes['White matter']:.0f} mL, warnings {len(seg.warnings)}", flush=True)


if __name__ == "__main__":
    main()

"""Figures behind metaseg/space/image_quality.py (issue 26): the tissue-contrast gate on clean and degraded scans.

  OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/exploration/quality_gate_calibration.py [--out F.json]
Segments (as `metaseg segment` does, shipped 3D tissue weights, seed 0, one torch thread) clean scans: the bundled
sample as a skull-stripped scan and as a whole head (deepbet + N4), and native scans of training and validation
subjects of both label groups (never test subjects); then degraded copies of the sample: motion ghosting (3 copies
at 25 % shifted 24, 36, 48 mm along the anterior-posterior axis, wrapped in the field of view), strong noise
(Gaussian, sigma 10 % of the brain's 99th percentile, inside the brain) and strong bias fields (x0.4..x1.6 across
the field of view, on the skull-stripped scan where auto runs no N4, and on the head where N4 runs; a +-40 % field
of 50 mm period on the head, finer than N4 models). Prints and records each run's image_quality figures, tissue
volumes and warnings.
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
from metaseg.train.artefacts import ghosts, gradient_bias, noise, ripple_bias

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Sample"
DATA = ROOT.parent / "shared" / "data"
# train: FreeSurfer, manual (the oldest brain), manual; validation: FreeSurfer, manual, manual
CLEAN_SUBJECTS = ["sub-01", "oas1-0113", "oas1-0061", "ws01", "oas1-0040", "oas1-0191"]


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
            ("degraded", "ecog_t1 bias x0.4-1.6", lambda: gradient_bias(t1())),
            ("degraded", "ecog_head bias x0.4-1.6 (N4)", lambda: gradient_bias(head())),
            ("degraded", "ecog_head ripple +-40% / 50 mm (N4)", lambda: ripple_bias(head()))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "quality_gate.json"))
    ap.add_argument("--only", nargs="*", help="names of cases to run, in this order (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    segmenter = metaseg.Segmenter(device="cpu")
    records: Dict[str, Dict] = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    todo = cases()
    if a.only:  # in the order given
        by_name = {name: (kind, name, make) for kind, name, make in todo}
        todo = [by_name[n] for n in a.only]
    for kind, name, make in todo:
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

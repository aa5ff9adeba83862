"""Repeat-scan agreement of the structure volumes a clinic reads: hippocampus and lateral ventricles (issue 20).

Per validation subject, the native scan is segmented with `--labels structures` as it is, and as repeated
copies of the same brain: re-positioned (the header moved by 3 mm and 3 deg, registration runs again),
re-sliced (resampled half a voxel off its grid), 2 % noise, and another fit seed. Each copy's structure
volumes are compared with the original's (absolute difference, %). Run by hand (not a test), e.g.
  .venv/bin/python benchmarks/structures_repeats.py --subjects ecog oas1-0040 --threads 2
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

import metaseg
from metaseg.io.data import subject_dir
from metaseg.io.readers import read_image
from metaseg.method.fit import SCHEDULES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flip_rate import half_voxel_resliced, rigid, with_header_moved  # noqa: E402
from repeat_scans import noisy  # noqa: E402

WATCHED = ("Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle", "Right-Lateral-Ventricle")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", nargs="+", default=["ecog", "oas1-0040"])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/structures_repeats.json")
    ap.add_argument("--weights", help="structures weights (default: the shipped ones)")
    ap.add_argument("--quality", default="fast", choices=("fast", "best"))
    ap.add_argument("--schedule", choices=SCHEDULES, help="the fit's batches (default: the weights' card)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seg = metaseg.Segmenter(device="cpu", labels="structures", weights=a.weights)
    if a.schedule:  # a benchmark's override of the card's plan
        m = seg.model(3)
        seg._models[3] = dataclasses.replace(m, plan=dataclasses.replace(m.plan, schedule=a.schedule))
    rows = []
    for s in a.subjects:
        scan = read_image(subject_dir(Path(a.data), s) / "native_t1.nii.gz")
        centre = np.array(scan.TransformContinuousIndexToPhysicalPoint([n / 2 for n in scan.GetSize()]))
        copies = {
            "re-positioned 3 mm / 3 deg": (with_header_moved(scan, rigid(3.0, 3.0, np.random.default_rng(1), centre)), 0),
            "re-sliced half a voxel": (half_voxel_resliced(scan), 0),
            "noise 2 %": (noisy(scan, 0.02, 0.0, seed=2), 0),
            "another fit seed": (scan, 3 if a.quality == "best" else 1),  # disjoint from the first run's fits
        }
        t0 = time.perf_counter()
        ref = seg(scan, seed=0, quality=a.quality).volumes
        for name, (img, seed) in copies.items():
            vol = seg(img, seed=seed, quality=a.quality).volumes
            diff = {k: round(100.0 * abs(vol[k] - ref[k]) / ref[k], 2) for k in WATCHED}
            diff["hippocampus L+R"] = round(100.0 * abs(vol[WATCHED[0]] + vol[WATCHED[1]] - ref[WATCHED[0]] - ref[WATCHED[1]])
                                            / (ref[WATCHED[0]] + ref[WATCHED[1]]), 2)
            rows.append({"subject": s, "copy": name, **diff})
            print(json.dumps(rows[-1]), file=sys.stderr)
        rows.append({"subject": s, "copy": "original (mL)", **{k: round(ref[k], 2) for k in WATCHED},
                     "seconds": round(time.perf_counter() - t0, 1)})
    keys = list(WATCHED) + ["hippocampus L+R"]
    print("| subject | copy | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 2))
    for r in rows:
        print(f"| {r['subject']} | {r['copy']} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    diffs = [r for r in rows if not r["copy"].startswith("original")]
    summary = {k: {"mean": round(float(np.mean([r[k] for r in diffs])), 2), "max": round(float(np.max([r[k] for r in diffs])), 2)}
               for k in keys}
    print("mean / worst |ΔV| %: " + ", ".join(f"{k} {v['mean']} / {v['max']}" for k, v in summary.items()))
    with open(a.json, "a") as f:
        f.write(json.dumps({"rows": rows, "summary": summary, "weights": a.weights or "metaseg3d_structures.safetensors",
                            "quality": a.quality, "schedule": a.schedule or "card",
                            "machine": f"{platform.machine()}, {a.threads} threads", "torch": torch.__version__,
                            "command": "benchmarks/structures_repeats.py " + " ".join(sys.argv[1:]),
                            "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

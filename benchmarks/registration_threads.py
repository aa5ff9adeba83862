"""What bit-reproducible registration costs: the bundled 3D sample registered to the template with ITK's
optimization on one thread (what `segment` does since issue 22) and on the machine's default thread count,
alternating, N times each: wall time and the spread of the affine parameters between repeats.

Run by hand (not a test):
  PYTHONPATH=MetaSegCore .venv/bin/python benchmarks/registration_threads.py --repeats 5
Appends one JSON record to --json (default docs/registration_threads.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import metaseg.space.registration as registration
from metaseg.io.readers import read_image
from metaseg.space.volume import register_to_template


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scan", default="Resources/Sample/ecog_t1.nii.gz")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="docs/registration_threads.json")
    a = ap.parse_args()
    scan = read_image(Path(a.scan))
    default = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    runs = {1: [], default: []}
    register_to_template(scan)  # warm-up: template read, caches
    for _ in range(a.repeats):
        for n in runs:
            registration.REGISTRATION_THREADS = n
            t0 = time.perf_counter()
            t, q = register_to_template(scan)
            runs[n].append((time.perf_counter() - t0, np.array(t.GetParameters()), q["ncc"]))
    rec = {"scan": a.scan, "default_itk_threads": default, "repeats": a.repeats, "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d"), "command": "benchmarks/registration_threads.py " + " ".join(sys.argv[1:])}
    for n, rows in runs.items():
        secs = [r[0] for r in rows]
        params = np.stack([r[1] for r in rows])
        rec[f"threads_{n}"] = {"seconds_median": round(float(np.median(secs)), 2), "seconds": [round(s, 2) for s in secs],
                               "max_parameter_spread": float((params.max(0) - params.min(0)).max()),
                               "ncc": sorted({round(r[2], 6) for r in rows})}
        print(f"{n} thread(s): median {np.median(secs):.2f} s ({', '.join(f'{s:.2f}' for s in secs)}), "
              f"max parameter spread {rec[f'threads_{n}']['max_parameter_spread']:.2g}")
    with open(a.json, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

"""Cohort throughput: 5 scans as one `metaseg batch` against 5 separate `metaseg segment` calls.

Run by hand:  .venv/bin/python benchmarks/bench_batch.py [--dims 2|3] [--repeats R]
Both sides run as real command lines (fresh processes, as a user or a job script runs them), one after
the other in each repeat, on the same scans with the same options: 2D slice 109 (`slice_norm`) or the
native 3D T1 (`native_t1`) of sub-01 ... sub-05 from ../shared/data/brains, shipped weights, `--device cpu`.
A separate call pays, every time, for the Python start, the torch import, the weights check and load and
(3D) the template read; the batch pays them once. Wall-clock seconds per scan, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "brains"
SUBJECTS = ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05"]
METASEG = [sys.executable, "-m", "metaseg"]


def separate(scans, out: Path, env) -> float:
    t0 = time.perf_counter()
    for s in scans:
        subprocess.run(METASEG + ["segment", str(s), "-o", str(out / f"{s.parent.name}.nii.gz"), "--device", "cpu",
                                  "--progress", "none", "--report", str(out / f"{s.parent.name}.json")], check=True, env=env)
    return time.perf_counter() - t0


def batch(scans, out: Path, env) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(METASEG + ["batch", *map(str, scans), "-o", str(out), "--device", "cpu", "--progress", "none"],
                       env=env)
    if p.returncode != 0:
        raise SystemExit(f"metaseg batch exited with {p.returncode}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS of both sides (0: torch's default, all cores; 1 suits a CPU shared with other jobs)")
    ap.add_argument("--json", help="write the figures here (default: docs/bench_batch_<dims>d.json)")
    a = ap.parse_args()
    name = "slice_norm.nii.gz" if a.dims == 2 else "native_t1.nii.gz"
    scans = [DATA / s / name for s in SUBJECTS]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    runs = []
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            sep = separate(scans, Path(d) / "separate", env)
            bat = batch(scans, Path(d) / "batch", env)
        runs.append({"separate_s": round(sep, 2), "batch_s": round(bat, 2)})
        print(f"repeat {r + 1}: 5 separate segment calls {sep:.1f} s ({sep / 5:.2f} s/scan), "
              f"one batch {bat:.1f} s ({bat / 5:.2f} s/scan), {sep / bat:.2f}x", flush=True)
    sep = sum(x["separate_s"] for x in runs) / len(runs) / len(scans)
    bat = sum(x["batch_s"] for x in runs) / len(runs) / len(scans)
    result = {"dims": a.dims, "scans": [str(s.relative_to(DATA)) for s in scans], "runs": runs,
              "separate_s_per_scan": round(sep, 2), "batch_s_per_scan": round(bat, 2), "speedup": round(sep / bat, 2),
              "command": "python benchmarks/bench_batch.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={a.threads or 'unset'}"}
    print(f"mean: separate {sep:.2f} s/scan, batch {bat:.2f} s/scan, {sep / bat:.2f}x")
    out = Path(a.json or ROOT / "docs" / f"bench_batch_{a.dims}d{'_t%d' % a.threads if a.threads else ''}.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

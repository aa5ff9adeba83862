"""Live-preview overhead: the same fit with and without labels emitted every N steps (issue: <= 10 %).

Run by hand:  .venv/bin/python benchmarks/bench_live.py [--dims 2 3]
The preview callback does what `metaseg segment --live-dir` does: decode the labels of the fit in
progress and write them as a NIfTI file that Slicer loads. Bundled sample, shipped weights, 2 threads.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from metaseg.io.atomic import write_all
from metaseg.io.readers import image_array_2d, labels_like, read_image, write_image
from metaseg.method.segment import segment_array
from metaseg.runtime import Hooks, Model
from metaseg.space.volume import segment_volume
from metaseg.method.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent


def run_2d(every: int, out: Path) -> float:
    w = load_weights(ROOT / "Resources/Weights/metaseg2d.safetensors")
    net = w.build()
    img = read_image(ROOT / "Resources/Sample/ecog_slice_t1.nii.gz")
    arr = image_array_2d(img)

    def live(step, labels):
        write_all([(out / f"live_{step:05d}.nii.gz", lambda tmp: write_image(labels_like(labels, img), tmp))])

    t0 = time.perf_counter()
    segment_array(net, w.log_lr, w.plan, arr, w.canvas, live=live if every else None, live_every=every)
    return time.perf_counter() - t0


def run_3d(every: int, out: Path) -> float:
    w = load_weights(ROOT / "Resources/Weights/metaseg3d.safetensors")
    net = w.build()
    img = read_image(ROOT / "Resources/Sample/ecog_t1.nii.gz")

    def live(step, labels_img):
        write_all([(out / f"live_{step:05d}.nii.gz", lambda tmp: write_image(labels_img, tmp))])

    res = segment_volume(img, Model(w, net, torch.device("cpu"), w.plan), hooks=Hooks(live=live if every else None, live_every=every))
    return res.timings["fit_s"]  # the fit alone: what the preview slows down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="docs/bench_live.json")
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for dims, everies, fn in ((2, (0, 5, 10, 20), run_2d), (3, (0, 25, 50), run_3d)):
        if dims not in a.dims:
            continue
        base = None
        for every in everies:
            times = []
            for _ in range(a.repeats if dims == 2 else 1):
                with tempfile.TemporaryDirectory() as d:
                    times.append(fn(every, Path(d)))
            t = float(np.median(times))
            base = t if every == 0 else base
            rows.append({"dims": dims, "live_every": every or "off", "seconds": round(t, 2),
                         "overhead_pct": None if every == 0 else round(100 * (t / base - 1), 1)})
            print(rows[-1], flush=True)
    rec = {"rows": rows, "machine": f"{platform.machine()}, 2 threads", "torch": torch.__version__,
           "command": "benchmarks/bench_live.py", "date": time.strftime("%Y-%m-%d")}
    with open(a.json, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

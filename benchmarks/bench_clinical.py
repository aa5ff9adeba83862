"""Clinical scans (issue 13): whole heads, thick slices and bias fields, on the 2-core CPU.

Run by hand once (not a test; 11 fits of ~1 min each plus 9 brain extractions of ~10 s):
  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_clinical.py extraction head
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_clinical.py thick --threads 1 --json docs/bench_clinical_thick.json
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_clinical.py bias --threads 1 --json docs/bench_clinical_bias.json
It prints markdown tables and writes every row to --json (default docs/bench_clinical.json):
  extraction  deepbet on each subject's native_head: mask Dice against FreeSurfer's brain mask
              (native_t1 > 0), volume, seconds, and the auto decision on native_head and native_t1
  head        segment native_head (auto: extraction) vs native_t1 (skull-stripped) of the same subject
  thick       1x1x3 and 1x1x5 mm copies (slab averages along the scan's superior-inferior axis) of the
              validation scans vs the labels resampled onto the same grid (nearest neighbour)
  bias        N4 on / off on the skull-stripped scan and on a copy multiplied by a smooth synthetic field
fg-Dice is scored against native_seg4 (or its thick-slice resampling). Validation subjects ws01, ecog
(ws01 has no whole-head scan); sub-01 is a training subject, used only as an extra whole-head check.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from metaseg.space.brain import decide_skull, extract_brain, prepare_brain
from metaseg.io.readers import read_image
from metaseg.metrics import foreground_dice
from metaseg.resources import default_weights
from metaseg.runtime import Model
from metaseg.space.volume import VolumeSettings, segment_volume
from metaseg.method.weights import load_weights

DATA = Path("../shared/data/brains")
HEADS = ["ecog", "sub-01", "sub-02", "sub-03", "sub-04", "sub-05", "sub-06", "sub-07", "sub-08"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def thick_copy(img: sitk.Image, labels: sitk.Image, mm: int):
    """Slabs of `mm` 1-mm voxels averaged along the axis closest to superior-inferior; labels resampled onto them."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(d[2])))  # LPS z = S
    f = [1, 1, 1]
    f[axis] = mm
    thick = sitk.BinShrink(sitk.Cast(img, sitk.sitkFloat32), f)
    lab = sitk.Resample(labels, thick, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return thick, lab


def biased_copy(img: sitk.Image) -> sitk.Image:
    """The scan times a smooth field exp(0.3 u_x + 0.2 u_y - 0.15 u_z^2), u = (p - brain centre) / 80 mm:
    about x0.6-x1.6 across the brain, a strong receive-coil inhomogeneity."""
    a = arr(img).astype(np.float32)
    zyx = np.indices(a.shape, dtype=np.float64).reshape(3, -1)
    m = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    p = m @ zyx[::-1] + np.array(img.GetOrigin())[:, None]
    c = p[:, a.reshape(-1) > 0].mean(1, keepdims=True)
    u = (p - c) / 80.0
    field = np.exp(0.3 * u[0] + 0.2 * u[1] - 0.15 * u[2] ** 2).reshape(a.shape)
    out = sitk.GetImageFromArray((a * field).astype(np.float32))
    out.CopyInformation(img)
    return out


class Runner:
    def __init__(self):
        w = load_weights(default_weights(3))
        self.model = Model.build(w)

    def segment(self, img: sitk.Image, ref: sitk.Image, mode: str = "off", n4: bool = False) -> dict:
        t0 = time.perf_counter()
        bm, info = prepare_brain(img, mode)
        res = segment_volume(img, self.model, VolumeSettings(bias_correction=n4), mask=None if bm is None else bm.mask)
        dt = time.perf_counter() - t0
        return {"fg_dice": round(foreground_dice(arr(res.labels), arr(ref)), 4), "seconds": round(dt, 1),
                "extraction": info, "ncc": round(res.registration["ncc"], 3), "psnr": round(res.psnr, 2),
                "warnings": res.warnings, **{k: round(v, 1) for k, v in res.timings.items()}}


def exp_extraction(_runner) -> list:
    rows = []
    for s in HEADS:
        head = read_image(DATA / s / "native_head.nii.gz")
        t1 = read_image(DATA / s / "native_t1.nii.gz")
        bm = extract_brain(head)
        fs = arr(t1) > 0
        d_head, _ = decide_skull(head, lambda _img: bm)
        d_t1, _ = decide_skull(t1)
        rows.append({"subject": s, "mask_dice_vs_freesurfer": round(dice(arr(bm.mask) > 0, fs), 4),
                     "mask_ml": round(bm.volume_ml), "freesurfer_ml": round(fs.sum() * np.prod(t1.GetSpacing()) / 1000),
                     "seconds": round(bm.seconds, 1), "auto_head": d_head.reason, "auto_t1": d_t1.reason})
    return rows


def exp_head(runner) -> list:
    rows = []
    for s in ("ecog", "sub-01"):
        ref = sitk.ReadImage(str(DATA / s / "native_seg4.nii.gz"))
        for f in ("native_t1.nii.gz", "native_head.nii.gz"):
            rows.append({"subject": s, "file": f, **runner.segment(read_image(DATA / s / f), ref, "auto")})
    return rows


def exp_thick(runner, slabs=(3, 5)) -> list:
    """1 mm rows: ecog's is in exp_head, ws01's in docs/results.md (bench_3d.py native), same code path."""
    rows = []
    for mm in slabs:
        for s in ("ws01", "ecog"):
            img = read_image(DATA / s / "native_t1.nii.gz")
            ref = sitk.ReadImage(str(DATA / s / "native_seg4.nii.gz"))
            thick, lab = thick_copy(img, ref, mm)
            rows.append({"subject": s, "slices_mm": mm, "size": list(thick.GetSize()), **runner.segment(thick, lab)})
    return rows


def exp_bias(runner) -> list:
    """N4 off/on on the biased copy, then on the scan itself (N4 off there: exp_head's ecog row)."""
    s = "ecog"
    img = read_image(DATA / s / "native_t1.nii.gz")
    ref = sitk.ReadImage(str(DATA / s / "native_seg4.nii.gz"))
    biased = biased_copy(img)
    rows = []
    for n4 in (False, True):
        rows.append({"subject": s, "input": "native_t1 x synthetic field", "n4": n4, **runner.segment(biased, ref, n4=n4)})
    rows.append({"subject": s, "input": "native_t1", "n4": True, **runner.segment(img, ref, n4=True)})
    return rows


def table(rows: list) -> str:
    keys = [k for k in rows[0] if k not in ("warnings", "extraction")]
    out = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("experiments", nargs="*", default=["extraction", "head", "thick", "bias"])
    p.add_argument("--json", default="docs/bench_clinical.json")
    p.add_argument("--slabs", type=int, nargs="+", default=[3, 5], help="thick: slab thicknesses in mm")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    runner = Runner()
    record = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "results": {}}
    for name in a.experiments:
        rows = exp_thick(runner, a.slabs) if name == "thick" else globals()[f"exp_{name}"](runner)
        record["results"][name] = rows
        print(f"\n## {name}\n\n{table(rows)}\n", flush=True)
        for r in rows:
            if r.get("extraction") or r.get("warnings"):
                print(f"- {r.get('subject')} {r.get('file', r.get('slices_mm', r.get('input', '')))}: "
                      f"{r.get('extraction', {}).get('reason', '')}; warnings: {r.get('warnings', [])}", flush=True)
        Path(a.json).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

"""Figures behind plausibility.TRAINING_BRAIN_ML (issue 26): how large the brains the model was trained on are.

  .venv/bin/python benchmarks/exploration/training_brain_sizes.py
Prints, per subject of the 'train' split (then 'validation', as a check that no clean scan is warned about): the
labelled volume of its reference labels (native_seg4 > 0) and the volume of its skull-stripped native scan
(native_t1 > 0, the brain mask a run would use), in mL, and the range of each.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from metaseg.io.data import load_splits

ROOT = Path("../shared/data")


def volume_ml(path: Path) -> float:
    img = sitk.ReadImage(str(path))
    return float((sitk.GetArrayViewFromImage(img) > 0).sum()) * float(np.prod(img.GetSpacing())) / 1000.0


def main() -> None:
    splits = load_splits()
    for split in ("train", "validation"):
        rows = []
        for s in splits[split]:
            d = ROOT / ("brains" if (ROOT / "brains" / s).is_dir() else "oasis-nmm") / s
            rows.append((volume_ml(d / "native_seg4.nii.gz"), volume_ml(d / "native_t1.nii.gz")))
            print(f"{split:<10} {s:<10} labelled {rows[-1][0]:6.0f} mL  brain mask {rows[-1][1]:6.0f} mL", flush=True)
        a = np.array(rows)
        print(f"{split}: labelled {a[:, 0].min():.0f}-{a[:, 0].max():.0f} mL, brain mask {a[:, 1].min():.0f}-"
              f"{a[:, 1].max():.0f} mL")


if __name__ == "__main__":
    main()

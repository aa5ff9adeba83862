"""Figures behind metaseg/space/plausibility.py, from the TRAINING subjects only (issue 16).

  .venv/bin/python benchmarks/exploration/plausibility_calibration.py
Prints, per training subject: each class's share of the labelled tissue (aligned volume, slice 109), the
nonzero volume of the skull-stripped native scan and of the head with skull, and the NCC with the template's
coronal slice 109 of: slice 109, slices 100 and 118, a sagittal and an axial slice, slice 109 upside down,
and a coronal slice of the unaligned native scan. Then the same for the held-out subjects, as a check.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from metaseg.io.data import load_splits
from metaseg.space.plausibility import slice_template_ncc
from metaseg.space.volume import load_template

DATA = Path("../shared/data/brains")


def fractions(path: Path) -> np.ndarray:
    c = np.bincount(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).ravel(), minlength=5)[1:5]
    return (c / c.sum()).round(3)


def litres(path: Path) -> float:
    img = sitk.ReadImage(str(path))
    return round(float((sitk.GetArrayFromImage(img) > 0).sum() * np.prod(img.GetSpacing()) / 1e6), 2)


def main() -> None:
    tpl = load_template()
    splits = load_splits()
    for group in ("train", "validation", "test"):
        print(f"## {group}")
        for s in splits[group]:
            d = DATA / s
            v = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "aligned_norm.nii.gz")))  # (A, I, L)
            nat = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "native_t1.nii.gz")))  # LIA conformed: (A, I, L)
            ncc = {"109": v[109], "100": v[100], "118": v[118], "sagittal": v[:, :, 80].T, "axial": v[:, 96, :],
                   "upside down": v[109][::-1], "native coronal": nat[128]}
            head = d / "native_head.nii.gz"
            print(s, "fractions 3D", fractions(d / "aligned_seg4.nii.gz"), "2D", fractions(d / "slice_seg4.nii.gz"),
                  "litres", litres(d / "native_t1.nii.gz"), litres(head) if head.exists() else "-",
                  "slice NCC", {k: round(slice_template_ncc(a, tpl), 3) for k, a in ncc.items()})


if __name__ == "__main__":
    main()

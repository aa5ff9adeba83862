"""Intensity inhomogeneity (bias field) correction with SimpleITK's N4, inside a brain mask.

N4 (Tustison et al. 2010) estimates a smooth multiplicative field from a shrunken copy (fast) and
divides the full-resolution scan by it. Measured (docs/results.md, benchmarks/bench_clinical.py): on a
copy of ecog with a strong smooth field fg-Dice 0.636 -> 0.817, on the scan itself 0.852 -> 0.857.
The CLI runs it by default on scans whose brain it extracted (raw-looking whole heads); skull-stripped
scans usually come from pipelines that corrected the bias already, and stay exactly as before.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk

SHRINK_MM = 4.0  # N4 works on a ~4 mm copy: the field is smooth, and 256^3 at 1 mm would take minutes
ITERATIONS = (50, 50, 30)  # per fitting level (three B-spline levels)


def n4_correct(scan: sitk.Image, mask: sitk.Image, iterations: Sequence[int] = ITERATIONS) -> sitk.Image:
    """The scan divided by N4's bias field, estimated inside `mask` (nonzero = brain); outside unchanged."""
    img = sitk.Cast(scan, sitk.sitkFloat32)
    m = sitk.Cast(mask > 0, sitk.sitkUInt8)
    factors = [max(1, int(round(SHRINK_MM / s))) for s in img.GetSpacing()]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(sitk.Shrink(img, factors), sitk.Shrink(m, factors))
    field = sitk.Exp(n4.GetLogBiasFieldAsImage(img))
    arr = sitk.GetArrayFromImage(img)
    inside = sitk.GetArrayViewFromImage(m) > 0
    arr[inside] = arr[inside] / sitk.GetArrayViewFromImage(field)[inside]
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(scan)
    return out

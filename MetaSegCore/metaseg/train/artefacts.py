"""Simulated acquisition artefacts, for the tests and benchmarks of the image-quality gate (space/image_quality.py).

Each takes a scan and returns a copy with the same geometry: motion ghosts (shifted copies of the image added at a
fraction of its intensity, as phase-encoding ghosts are, wrapped in the field of view), Gaussian noise inside the
brain, and multiplicative bias fields, smooth (a gradient across the field of view, what N4 removes) or fine (a
ripple of a few centimetres, finer than N4's fields).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(ref)
    return out


def ghosts(img: sitk.Image, shifts_mm: Sequence[float] = (24.0, 36.0, 48.0), weight: float = 0.25) -> sitk.Image:
    """`img` plus copies of itself at `weight` of its intensity, shifted by `shifts_mm` along the voxel axis closest
    to anterior-posterior (a common phase-encoding direction) and wrapped: motion ghosting."""
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    d = np.array(img.GetDirection()).reshape(3, 3)
    axis_xyz = int(np.argmax(np.abs(d[1])))  # the voxel axis most along LPS y
    out = a.copy()
    for s in shifts_mm:
        out += weight * np.roll(a, int(round(s / img.GetSpacing()[axis_xyz])), axis=2 - axis_xyz)
    return _like(out, img)


def noise(img: sitk.Image, sigma: float = 0.10, seed: int = 0) -> sitk.Image:
    """Gaussian noise of `sigma` x the brain's 99th percentile on the brain's (nonzero) voxels."""
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    brain = a > 0
    scale = float(np.percentile(a[brain], 99))
    a[brain] = np.maximum(a[brain] + np.random.default_rng(seed).normal(0, sigma * scale, int(brain.sum())), 1e-3)
    return _like(a, img)


def gradient_bias(img: sitk.Image, low: float = 0.4, high: float = 1.6) -> sitk.Image:
    """A smooth multiplicative field rising from `low` to `high` along the field of view's diagonal."""
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n, dtype=np.float32) for n in a.shape], indexing="ij")
    return _like(a * (low + (high - low) * (x + y + z) / 3.0), img)


def ripple_bias(img: sitk.Image, amplitude: float = 0.4, period_mm: float = 50.0) -> sitk.Image:
    """A multiplicative field of 1 +- `amplitude` with a `period_mm` period along every axis: finer than N4 models."""
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) * s for n, s in zip(a.shape, img.GetSpacing()[::-1])],
                          indexing="ij")
    k = 2 * np.pi / period_mm
    return _like(a * (1 + amplitude * np.sin(k * x) * np.sin(k * y) * np.sin(k * z)), img)

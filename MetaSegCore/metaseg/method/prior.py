"""A spatial prior on the model grid: how often each class lies at a point across the training brains.

Every scan is registered affinely to the template before the fit, so a point of the model grid is
roughly the same place in every brain. The fraction of training brains whose label at that place
is each class, smoothed by a few millimetres for the registration's residual error, is a prior
the head can read beside the fitted features: it tells the head where the small structures lie
(inferior lateral ventricles, accumbens, the hippocampus's border with the amygdala), and it does
not depend on the fit's random path, so the labels move less between seeds and repeat scans.

The prior is stored at a quarter of the model grid's resolution (4 mm on the 1 mm 3D grid), as 8-bit
probabilities: it is smooth by construction, and at 4 mm the 32 classes take 3.4 MB (27.5 MB at 2 mm) so that
the weights stay small enough to ship. What 4 mm costs, on the validation brains (the prior alone, argmax):
mean structure Dice 0.611 against 0.631 at 2 mm (docs/results.md).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

PRIOR_SIGMA_MM = 2.0  # smoothing of the class frequencies (affine registration leaves a few mm)
PRIOR_FACTOR = 4  # the stored grid is the model grid subsampled by this factor per axis


def coarse_shape(canvas: Sequence[int], factor: int = PRIOR_FACTOR) -> Tuple[int, ...]:
    """The stored grid's shape: spans the same [-1, 1] box as the canvas (corners on corners)."""
    return tuple((int(c) - 1) // factor + 1 for c in canvas)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def smooth(volumes: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (C, D, H, W) volumes or (C, H, W) images, zero outside (the brain's edge is
    far in).

    Each axis is a sum of shifted copies, tap by tap: every voxel adds its terms in the same order whatever the number
    of threads, so the result is the same bit for bit on any machine setting (a convolution's reductions are not;
    the head reads these blurs, `metaseg.method.context`), and it is faster than conv3d on the CPU."""
    if sigma_vox <= 0:
        return volumes
    taps = _gaussian_kernel(sigma_vox).tolist()
    r = (len(taps) - 1) // 2
    x = volumes
    last = volumes.dim() - 1
    for axis in range(1, volumes.dim()):
        n = x.shape[axis]
        pad = [0, 0] * last  # F.pad lists the last axis first
        pad[2 * (last - axis)] = pad[2 * (last - axis) + 1] = r
        padded = F.pad(x, pad)
        out = torch.zeros_like(x)
        for i, w in enumerate(taps):
            out.add_(padded.narrow(axis, i, n), alpha=w)
        x = out
    return x


def class_fractions(labels: np.ndarray, n_classes: int, factor: int = PRIOR_FACTOR,
                    sigma_mm: float = PRIOR_SIGMA_MM) -> torch.Tensor:
    """One brain's classes (class indices on the 1 mm model grid) as smoothed one-hot maps on the coarse grid,
    (C, d, h, w) float32. Averaging these over brains gives the prior (and leaving one out is a subtraction)."""
    lab = torch.from_numpy(np.asarray(labels, np.int64))
    canvas = tuple(lab.shape)
    out = torch.empty((n_classes,) + coarse_shape(canvas, factor))
    margin = int(math.ceil(3 * sigma_mm)) + 1  # the model grid is 1 mm
    for c in range(n_classes):  # one class at a time, within its bounding box: most structures are small
        where = (lab == c).nonzero()
        full = torch.zeros(canvas)
        if where.shape[0]:
            lo = [max(0, int(v) - margin) for v in where.min(0).values]
            hi = [min(n, int(v) + margin + 1) for v, n in zip(where.max(0).values, canvas)]
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            full[box] = smooth((lab[box] == c).float()[None], sigma_mm)[0]
        out[c] = F.interpolate(full[None, None], size=out.shape[1:], mode="trilinear", align_corners=True)[0, 0]
    return out


class SpatialPrior:
    """Class probabilities on the coarse model grid, read at model coordinates in [-1, 1]."""

    def __init__(self, probs: torch.Tensor):
        if probs.dim() != 4:
            raise ValueError(f"a 3D prior is (classes, d, h, w), got shape {tuple(probs.shape)}")
        self.probs = probs.float()

    @property
    def n_classes(self) -> int:
        return int(self.probs.shape[0])

    @classmethod
    def build(cls, label_maps: Iterable[np.ndarray], n_classes: int) -> "SpatialPrior":
        """The mean of `class_fractions` over brains (class indices on the model grid)."""
        total, n = None, 0
        for lab in label_maps:
            f = class_fractions(lab, n_classes)
            total = f if total is None else total + f
            n += 1
        if n == 0:
            raise ValueError("no label maps to build a prior from")
        return cls(total / n)

    def without(self, fractions: torch.Tensor, n_brains: int) -> "SpatialPrior":
        """The prior of the other `n_brains - 1` brains: what a training brain's head must see, or it would
        learn to trust a prior that already holds its own labels."""
        return SpatialPrior(((self.probs * n_brains - fractions) / (n_brains - 1)).clamp_min(0))

    def at(self, coords: torch.Tensor) -> torch.Tensor:
        """(N, C) probabilities at model coordinates (N, 3), trilinear; 0 outside the grid."""
        c = coords.to(self.probs.device, torch.float32).flip(1)  # grid_sample wants (x, y, z)
        out = F.grid_sample(self.probs[None], c.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="zeros",
                            align_corners=True)
        return out.reshape(self.n_classes, -1).T

    def to_uint8(self) -> torch.Tensor:
        """The stored form: probabilities rounded to 1/255 (smaller than any structure's Dice matters)."""
        return torch.round(self.probs.clamp(0, 1) * 255).to(torch.uint8)

    @classmethod
    def from_uint8(cls, stored: torch.Tensor) -> "SpatialPrior":
        return cls(stored.float() / 255.0)

    def to(self, device: torch.device) -> "SpatialPrior":
        return SpatialPrior(self.probs.to(device))

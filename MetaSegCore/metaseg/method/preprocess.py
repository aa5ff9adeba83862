"""Intensity normalization, padding to the model canvas, and training-time augmentation."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

UPPER_PERCENTILE = 99.0


def normalize_intensity(image: np.ndarray, mask: Optional[np.ndarray] = None, denoise: bool = False) -> np.ndarray:
    """Scale a skull-stripped image so its brain's 99th percentile is 1, background stays 0.

    A percentile of the brain voxels does not depend on how the scan was exported (0-255,
    0-1, FreeSurfer brainmask or norm) nor on a few bright outliers, unlike min/max.
    `denoise`: take the percentile of a 3x3(x3) median-filtered copy instead. Scanner noise widens
    white matter's bright tail and so raises the plain percentile: on the sample scan, 4 % noise
    darkened normalized white matter by 5.7 % and shrank it by 5 % in the labels; with the filtered
    percentile by 2.6 % and 1 % (docs/results.md, repeat scans). The 3D path uses it.
    """
    img = np.asarray(image, dtype=np.float32)
    brain = mask if mask is not None else img > 0
    if not brain.any():
        raise ValueError("the image has no foreground voxels (all values <= 0): expected a skull-stripped brain scan")
    ref = sitk.GetArrayFromImage(sitk.Median(sitk.GetImageFromArray(img), [1] * img.ndim)) if denoise else img
    hi = float(np.percentile(ref[brain], UPPER_PERCENTILE))
    if not math.isfinite(hi) or hi <= 0:
        raise ValueError("could not normalize intensities: the brain's 99th percentile is not positive")
    out = np.clip(img / hi, 0.0, 1.0)
    out[img <= 0] = 0.0
    return out


def pad_to_canvas(array: np.ndarray, canvas: Tuple[int, ...]) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Centre `array` on a zero canvas; return it and the slices that cut the array back out."""
    if array.ndim != len(canvas):
        raise ValueError(f"expected a {len(canvas)}D array, got shape {array.shape}")
    if any(s > c for s, c in zip(array.shape, canvas)):
        raise ValueError(f"image of size {array.shape} is larger than the model canvas {tuple(canvas)}")
    out = np.zeros(canvas, dtype=array.dtype)
    region = tuple(slice((c - s) // 2, (c - s) // 2 + s) for s, c in zip(array.shape, canvas))
    out[region] = array
    return out, region


def grid_coords(shape: Tuple[int, ...], index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Model coordinates of a canvas's pixels, (N, ndim) in [-1, 1]: all of them in C order,
    or only those at the flat indices `index` (so a 3D volume's brain needs no full grid)."""
    if index is None:
        axes = [torch.linspace(-1.0, 1.0, s) for s in shape]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    out = torch.empty(index.shape[0], len(shape))
    rest = index.clone()
    for d in reversed(range(len(shape))):
        out[:, d] = (rest % shape[d]).float() * (2.0 / max(shape[d] - 1, 1)) - 1.0
        rest //= shape[d]
    return out


def sample_grid(image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Values of a canvas-shaped `image` at model coordinates (N, ndim), (bi/tri)linearly
    interpolated: exactly the pixel values at `grid_coords` (the same [-1, 1] convention), and
    0 outside the canvas."""
    c = coords.to(image.device, torch.float32).flip(1)  # grid_sample wants (x, y[, z]) = reversed array order
    grid = c.reshape(1, -1, *([1] * (image.dim() - 1)), image.dim())
    out = F.grid_sample(image[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(-1)


def augment_points(coords: torch.Tensor, values: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random small affine + intensity changes of an image given as points (coords, values).

    Moving the coordinates instead of resampling the image is exact and costs nothing in 3D:
    the network sees the same voxels at slightly rotated, scaled and shifted positions, as it
    would for a scan aligned a little differently. Intensity: gamma, contrast and a smooth
    multiplicative bias field, as in `augment_2d`.
    """

    def u(lo: float, hi: float, n: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    d = coords.shape[1]
    a = torch.eye(d) + u(-0.06, 0.06, d * d).reshape(d, d)  # rotation/shear/scale of up to ~6 %
    t = u(-0.03, 0.03, d)
    new = coords @ a.T.to(coords) + t.to(coords)
    v = values.clamp(min=0) ** float(u(0.75, 1.35))
    mean = v.mean()
    v = (v - mean) * float(u(0.85, 1.2)) + mean
    bias = torch.exp(coords @ u(-0.15, 0.15, d).to(coords))
    v = (v * bias).clamp(0.0, 1.0)
    return new, torch.where(values > 0, v, torch.zeros_like(v))


def add_noise(values: torch.Tensor, max_sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise of a random level sigma ~ U(0, `max_sigma`) (in units of the normalized
    intensity, i.e. of the brain's 99th percentile) on the brain's points; background stays 0.

    Real scans are noisier than FreeSurfer's conformed training volumes (`metaseg train --noise`).
    A 3D head retrained with it did not change how noise moves tissue volumes: the cause was the
    normalization (`normalize_intensity(denoise=True)`; docs/results.md, repeat scans)."""
    sigma = max_sigma * float(torch.rand((), generator=gen))
    noise = torch.randn(values.shape, generator=gen).to(values) * sigma
    return torch.where(values > 0, (values + noise).clamp(1e-3, 1.0), values)


def augment_2d(image: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random small affine + intensity changes of one (H, W) slice; the labels follow the geometry.

    Intensity: gamma, contrast, smooth multiplicative bias field and noise inside the brain, then
    renormalization, so that scans prepared differently (brainmask vs norm) look alike to the model.
    """

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    h, w = image.shape
    ang = math.radians(u(-6, 6))
    sc = u(0.94, 1.06)
    tx, ty = u(-0.04, 0.04), u(-0.04, 0.04)
    theta = torch.tensor([[math.cos(ang) / sc, -math.sin(ang) / sc, tx], [math.sin(ang) / sc, math.cos(ang) / sc, ty]])
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=True)
    img = F.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
    lab = F.grid_sample(labels[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)[0, 0]
    brain = img > 1e-3
    # intensity: gamma and contrast around the brain mean
    img = img.clamp(min=0) ** u(0.7, 1.5)
    mean = img[brain].mean() if brain.any() else img.mean()
    img = (img - mean) * u(0.8, 1.25) + mean
    # smooth bias field: exp of a random low-order polynomial
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    c = [u(-0.2, 0.2) for _ in range(5)]
    img = img * torch.exp(c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx * xx + c[4] * yy * yy)
    img = img + u(0.0, 0.03) * torch.randn(img.shape, generator=gen)
    img = torch.where(brain, img, torch.zeros_like(img))
    img = torch.from_numpy(normalize_intensity(img.numpy(), brain.numpy())) if brain.any() else img
    return img, lab.to(torch.uint8)

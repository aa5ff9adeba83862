"""The image around a point, as columns the segmentation head reads (`ModelConfig.head_context`).

The head decodes each point on its own: the fitted network's features and the voxel's intensity say what the image
is *at* the point, not what surrounds it, and a voxel of the hippocampus has the intensity of the cortex beside it.
These columns (15 in 3D, 11 in 2D) add the neighbourhood, measured on the scan itself (its canvas image, as the fit
sees it):
the image smoothed over 1, 2 and 4 voxels at the point, and the 1-voxel (2-voxel) smoothed image 2 (4) voxels away
along each axis, less the point's 1-voxel smoothed value. Smoothing makes them stable under noise and re-slicing;
they cost three blurs of the canvas per scan and an interpolation per column and point (docs/results.md, part 4).
"""
from __future__ import annotations

import math

import torch

from .preprocess import sample_grid
from .prior import smooth

SIGMAS = (1.0, 2.0, 4.0)  # voxels of the 1 mm model grid
OFFSETS = ((0, 2), (1, 4))  # (which smoothed image, how many voxels away) for the differences along each axis


def n_columns(dims: int, sigmas=SIGMAS, offsets=OFFSETS) -> int:
    """How many columns the context adds for an image of `dims` (2 or 3) dimensions."""
    return len(sigmas) + 2 * dims * len(offsets)


class ImageContext:
    """The smoothed copies of one canvas image (2D or 3D), read at model coordinates by `at`.

    Only the image's non-zero box (with a margin as wide as the widest blur) is blurred: the canvas around a brain is
    zeros, and the blurs of zeros stay zeros, so the columns are the same as the whole canvas's, in less time."""

    def __init__(self, image: torch.Tensor, sigmas=SIGMAS, offsets=OFFSETS):
        """`sigmas`, `offsets`: the columns (the module's, which the shipped head reads; others for experiments)."""
        if image.dim() not in (2, 3):
            raise ValueError(f"the head's image context is for 2D or 3D canvas images, got shape {tuple(image.shape)}")
        dims = image.dim()
        shape = torch.tensor(image.shape)
        nz = torch.nonzero(image)
        self.offsets = tuple(offsets)
        margin = int(math.ceil(3 * max(sigmas))) + 1  # beyond the blur kernel's reach everything stays 0
        lo = (nz.min(0).values - margin).clamp_min(0) if len(nz) else torch.zeros(dims, dtype=torch.long)
        hi = torch.minimum(nz.max(0).values + margin + 1, shape) if len(nz) else shape.clone()
        lo = torch.minimum(lo, (hi - 2).clamp_min(0))  # two voxels at least along each axis, so it has a step
        box = image.detach().float()[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))][None]
        self.volumes = [smooth(box, s)[0] for s in sigmas]
        # model coordinates of the canvas -> those of the box: the canvas voxel index, less the box's corner
        n, nb = (shape - 1).clamp_min(1).float(), (hi - lo - 1).clamp_min(1).float()
        self.scale, self.shift = n / nb, (n - 2 * lo.float()) / nb - 1
        self.step = 2.0 / nb  # one voxel in the box's coordinates

    def at(self, coords: torch.Tensor) -> torch.Tensor:
        """(N, n_columns(dims)) context columns at model coordinates (N, dims) of the canvas (more or fewer for other
        sigmas and offsets)."""
        dev = self.volumes[0].device
        coords = coords.to(dev, torch.float32) * self.scale.to(dev) + self.shift.to(dev)
        cols = [sample_grid(v, coords) for v in self.volumes]
        for which, dist in self.offsets:
            for axis in range(coords.shape[1]):
                for sign in (-1.0, 1.0):
                    off = torch.zeros(coords.shape[1], device=dev)
                    off[axis] = sign * dist * float(self.step[axis])
                    cols.append(sample_grid(self.volumes[which], coords + off) - cols[0])
        return torch.stack(cols, 1)

"""The image around a point, as columns the segmentation head reads (`ModelConfig.head_context`, 3D).

The head decodes each point on its own: the fitted network's features and the voxel's intensity say what the image
is *at* the point, not what surrounds it, and a voxel of the hippocampus has the intensity of the cortex beside it.
These 15 columns add the neighbourhood, measured on the scan itself (its canvas image, as the fit sees it):
the image smoothed over 1, 2 and 4 voxels at the point, and the 1-voxel (2-voxel) smoothed image 2 (4) voxels away
along each axis, less the point's 1-voxel smoothed value. Smoothing makes them stable under noise and re-slicing; they cost three blurs of the
canvas per scan and 15 interpolations per point (docs/results.md, part 4).
"""
from __future__ import annotations

import torch

from .preprocess import sample_grid
from .prior import smooth

SIGMAS = (1.0, 2.0, 4.0)  # voxels of the 1 mm model grid
OFFSETS = ((0, 2), (1, 4))  # (which smoothed image, how many voxels away) for the differences along each axis
N_COLUMNS = len(SIGMAS) + 6 * len(OFFSETS)


class ImageContext:
    """The smoothed copies of one canvas image (3D), read at model coordinates by `at`."""

    def __init__(self, image: torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"the head's image context is for 3D canvas images, got shape {tuple(image.shape)}")
        vol = image.detach().float()[None]
        self.volumes = [smooth(vol, s)[0] for s in SIGMAS]
        self.step = 2.0 / (torch.tensor(image.shape, dtype=torch.float32) - 1)  # one voxel in model coordinates

    def at(self, coords: torch.Tensor) -> torch.Tensor:
        """(N, N_COLUMNS) context columns at model coordinates (N, 3)."""
        coords = coords.to(self.volumes[0].device, torch.float32)
        cols = [sample_grid(v, coords) for v in self.volumes]
        for which, dist in OFFSETS:
            for axis in range(3):
                for sign in (-1.0, 1.0):
                    off = torch.zeros(3, device=coords.device)
                    off[axis] = sign * dist * float(self.step[axis])
                    cols.append(sample_grid(self.volumes[which], coords + off) - cols[0])
        return torch.stack(cols, 1)

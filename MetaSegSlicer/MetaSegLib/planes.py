"""Slice-view planes for cross-sections: Slicer's RAS slice geometry <-> the core's LPS planes.

Pure numpy, so it is tested without Slicer. A slice node's SliceToRAS matrix holds the in-plane
directions (columns 0 and 1) and the plane's centre (column 3); its field of view gives the extent.
"""
from typing import Sequence, Tuple

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
MAX_PIXELS = 4_000_000  # a 2000x2000 plane: about 15 s of decoding on a 2-core CPU


def plane_from_slice(slice_to_ras: np.ndarray, field_of_view: Sequence[float], spacing_mm: float,
                     max_extent_mm: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Tuple[float, float], float]:
    """(centre, u, v in LPS, (width, height) mm, spacing mm) of the plane a slice view shows.

    The extent is the view's field of view, cut to `max_extent_mm` (beyond the scan there is only
    background); the spacing grows if needed so that the plane has at most MAX_PIXELS pixels.
    """
    m = np.asarray(slice_to_ras, float).reshape(4, 4)
    u, v = m[:3, 0], m[:3, 1]
    if np.linalg.norm(u) < 1e-9 or np.linalg.norm(v) < 1e-9:
        raise ValueError("the slice view's orientation matrix is degenerate")
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    extent = (min(float(field_of_view[0]), max_extent_mm), min(float(field_of_view[1]), max_extent_mm))
    spacing = float(spacing_mm)
    pixels = (extent[0] / spacing + 1) * (extent[1] / spacing + 1)
    if pixels > MAX_PIXELS:
        spacing *= float(np.sqrt(pixels / MAX_PIXELS))
    return RAS_TO_LPS @ m[:3, 3], RAS_TO_LPS @ u, RAS_TO_LPS @ v, extent, spacing


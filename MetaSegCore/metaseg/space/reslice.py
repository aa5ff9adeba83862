"""Cross-sections of a fitted 3D INR on any plane, at any pixel spacing, without refitting.

A plane is given in physical coordinates (LPS mm, as ITK and the files on disk): an origin
(the first pixel's centre) and two orthonormal in-plane directions, or a centre and a normal.
The result is a one-slice 3D image whose header places it exactly on that plane, so any viewer
(3D Slicer included) shows it where it belongs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .geometry import rotation_matrix
from ..io.readers import InputError

# The volumes drawn here are fitted.FittedVolume objects (anything with `query` and `info`): fitted.py imports this
# module for FittedVolume.reslice, so this one does not import it back.

# In-plane directions (u: columns, v: rows) of the standard planes, in LPS
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # normal S/I
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # normal A/P
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),  # normal L/R
}
# A plane of more pixels than this is refused: 64 million pixels are a 8000x8000 image, ~2 GB of probabilities.
MAX_PLANE_PIXELS = 64_000_000


@dataclass(frozen=True)
class Plane:
    origin: Tuple[float, float, float]  # physical centre of pixel (0, 0)
    u: Tuple[float, float, float]  # unit direction of increasing column index
    v: Tuple[float, float, float]  # unit direction of increasing row index
    size: Tuple[int, int]  # (columns, rows)
    spacing: Tuple[float, float]  # mm between pixel centres along u and v

    def __post_init__(self) -> None:
        u, v = np.asarray(self.u, float), np.asarray(self.v, float)
        if abs(np.linalg.norm(u) - 1) > 1e-6 or abs(np.linalg.norm(v) - 1) > 1e-6 or abs(u @ v) > 1e-6:
            raise InputError("the plane's directions u and v must be orthonormal")
        if min(self.size) < 1 or min(self.spacing) <= 0:
            raise InputError(f"plane size must be >= 1 pixel and spacing > 0 (got {self.size}, {self.spacing})")

    @classmethod
    def centred(cls, centre: Sequence[float], u: Sequence[float], v: Sequence[float], extent_mm: Sequence[float],
                spacing: Sequence[float]) -> "Plane":
        """The plane of directions (u, v) through `centre`, `extent_mm` wide and high, at `spacing`."""
        u, v = _unit(u), _unit(v)
        if np.linalg.norm(np.cross(u, v)) < 1e-6:
            raise InputError("the plane's directions u and v are parallel: give two different in-plane directions")
        v = _unit(v - (v @ u) * u)  # orthogonalize v against u
        size = plane_size(extent_mm, spacing)
        origin = np.asarray(centre, float) - (size[0] - 1) / 2 * spacing[0] * u - (size[1] - 1) / 2 * spacing[1] * v
        return cls(tuple(origin), tuple(u), tuple(v), size, tuple(float(s) for s in spacing))

    @classmethod
    def from_normal(cls, centre: Sequence[float], normal: Sequence[float], extent_mm: Sequence[float],
                    spacing: Sequence[float]) -> "Plane":
        """The plane through `centre` perpendicular to `normal`; u is the in-plane direction closest to L."""
        n = _unit(normal)
        ref = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        u = _unit(ref - (ref @ n) * n)
        return cls.centred(centre, u, np.cross(n, u), extent_mm, spacing)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.u, self.v)

    def points(self) -> np.ndarray:
        """Physical centres of all pixels, (rows * columns, 3), row-major."""
        j, i = np.meshgrid(np.arange(self.size[1]), np.arange(self.size[0]), indexing="ij")
        o, u, v = (np.asarray(x, float) for x in (self.origin, self.u, self.v))
        return (o + i.reshape(-1, 1) * self.spacing[0] * u + j.reshape(-1, 1) * self.spacing[1] * v)

    def image(self, array: np.ndarray) -> sitk.Image:
        """`array` (rows, columns[, components]) as a one-slice 3D image placed on this plane."""
        arr = np.asarray(array)
        vector = arr.ndim == 3
        img = sitk.GetImageFromArray(arr[None], isVector=vector)
        img.SetOrigin(tuple(float(x) for x in self.origin))
        img.SetSpacing((self.spacing[0], self.spacing[1], min(self.spacing)))
        d = np.column_stack([self.u, self.v, self.normal])
        img.SetDirection(tuple(float(x) for x in d.ravel()))
        return img


def plane_size(extent_mm: Sequence[float], spacing: Sequence[float]) -> Tuple[int, int]:
    """Pixels (columns, rows) of a plane `extent_mm` wide and high at `spacing`: InputError unless every number is
    finite, extent >= 0, spacing > 0 and the plane has at most MAX_PLANE_PIXELS. Checked in floating point
    before any conversion to integers (1e308 mm at 1e-10 mm would overflow it)."""
    e, s = np.asarray(extent_mm, float), np.asarray(spacing, float)
    if e.shape != (2,) or s.shape != (2,) or not (np.isfinite(e).all() and np.isfinite(s).all()):
        raise InputError(f"a plane's extent and spacing must be two finite numbers each (got {list(e)}, {list(s)})")
    if (s <= 0).any() or (e < 0).any():
        raise InputError(f"a plane's spacing must be more than 0 mm and its extent not negative (got spacing "
                         f"{list(s)}, extent {list(e)})")
    with np.errstate(over="ignore"):
        counts = np.floor(e / s + 1e-9) + 1  # may be inf: compared as floats, never converted
    if not np.isfinite(counts).all() or float(counts[0]) * float(counts[1]) > MAX_PLANE_PIXELS:
        raise InputError(f"the plane would be {e[0]:g} x {e[1]:g} mm at {s[0]:g} mm pixels: more than the "
                         f"{MAX_PLANE_PIXELS:,} pixels drawn at most; use a larger --spacing or a smaller --extent")
    return int(counts[0]), int(counts[1])


def standard_plane(reference: dict, orientation: str = "axial", spacing: Optional[float] = None,
                   angles_deg: Sequence[float] = (0.0, 0.0, 0.0), offset_mm: float = 0.0,
                   extent_mm: Optional[float] = None) -> Plane:
    """A plane through the centre of a fitted volume's reference grid (its `info["reference"]`).

    `orientation` axial, coronal or sagittal, tilted by `angles_deg` (about x, y, z) for an oblique
    plane and moved `offset_mm` along its normal; `extent_mm` wide and high (default: the grid's
    longest side, which holds the head in any orientation: scans centre it). Default spacing: the
    grid's smallest.
    """
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    size = np.array(reference["size"], float)
    sp = np.array(reference["spacing"], float)
    d = np.array(reference["direction"], float).reshape(3, 3)
    centre = np.array(reference["origin"], float) + d @ ((size - 1) / 2 * sp)
    r = rotation_matrix(angles_deg)
    u, v = (r @ np.asarray(x) for x in ORIENTATIONS[orientation])
    centre = centre + offset_mm * np.cross(u, v)
    extent = extent_mm or float(((size - 1) * sp).max())
    step = float(spacing) if spacing else float(sp.min())
    return Plane.centred(centre, u, v, (extent, extent), (step, step))


def reslice(volume: Any, plane: Plane, what: str = "labels") -> sitk.Image:
    """Labels (uint8), class probabilities (float32 vector) or intensity (float32) on `plane`."""
    values = volume.query(plane.points(), what)
    rows, cols = plane.size[1], plane.size[0]
    arr = values.reshape(rows, cols, -1) if what == "probabilities" else values.reshape(rows, cols)
    return plane.image(arr)


def plane_warning(volume: Any, plane: Plane, image: sitk.Image) -> Optional[str]:
    """A warning when `image` (`reslice`'s result on `plane`) is background at every pixel: the plane misses the
    fitted brain (e.g. an --offset or --origin far from the head), which would otherwise look like a result."""
    arr = sitk.GetArrayViewFromImage(image)
    empty = bool((arr[..., 0] >= 1.0).all()) if image.GetNumberOfComponentsPerPixel() > 1 else not arr.any()
    if not empty:
        return None
    ref = volume.info["reference"]
    d = np.array(ref["direction"], float).reshape(3, 3)
    centre = np.array(ref["origin"], float) + d @ ((np.array(ref["size"], float) - 1) / 2 * np.array(ref["spacing"]))
    middle = np.asarray(plane.origin) + (plane.size[0] - 1) / 2 * plane.spacing[0] * np.asarray(plane.u) \
        + (plane.size[1] - 1) / 2 * plane.spacing[1] * np.asarray(plane.v)
    apart = abs(float(plane.normal @ (centre - np.asarray(plane.origin))))
    return (f"the plane misses the fitted brain: every pixel is background. It passes {apart:.0f} mm from the scan's "
            f"centre ({', '.join(f'{c:.1f}' for c in centre)} LPS mm; the plane's middle is at "
            f"{', '.join(f'{c:.1f}' for c in middle)}): check --offset or --origin")


def _unit(x: Sequence[float]) -> np.ndarray:
    x = np.asarray(x, float)
    n = np.linalg.norm(x)
    if not np.isfinite(x).all():
        raise InputError(f"a plane direction must be finite numbers (got {tuple(x)})")
    if n < 1e-12:
        raise InputError("a plane direction must not be the zero vector")
    return x / n

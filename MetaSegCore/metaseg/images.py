"""The images a Python caller may hand to `metaseg.segment`, turned into one SimpleITK image.

Accepted: a path (any format `metaseg segment` reads, via `io.read_image`), a `SimpleITK.Image`, a
nibabel image (nibabel is optional: only such callers need it), or a numpy array with its geometry.

Conventions (the same as the files on disk): physical coordinates are LPS millimetres, as in ITK and
3D Slicer. A numpy array comes in one of two orders, each the natural one of where it came from:
- with `spacing=` (and optionally `origin=`, `direction=`): SimpleITK's order, the array indexed
  `[k, j, i]` (slowest axis first, as `SimpleITK.GetArrayFromImage` gives it), while `spacing`,
  `origin` and `direction` are listed for `(i, j, k)` like `Image.GetSpacing()`, `GetOrigin()` and
  `GetDirection()` (row-major 3x3, columns = the voxel axes' directions in LPS);
- with `affine=`: nibabel's order, the array indexed `[i, j, k]` and `affine` the 4x4 voxel-to-RAS
  matrix, exactly as `nibabel.Nifti1Image(array, affine)` would take them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .io.readers import InputError, read_image

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class InputImage:
    """An image to segment as SimpleITK holds it, with what to call it in the report and whether its caller
    indexes arrays in nibabel's [i, j, k] order (then `Segmentation.array` is given back in that order)."""

    image: sitk.Image
    source: str
    nibabel_order: bool = False
    path: Optional[Path] = None  # the file it was read from: never to be overwritten by its outputs


def as_input_image(image: Any, *, spacing: Optional[Sequence[float]] = None, origin: Optional[Sequence[float]] = None,
                   direction: Optional[Sequence[float]] = None, affine: Optional[Any] = None) -> InputImage:
    """`image` (path, SimpleITK image, nibabel image or numpy array) as an InputImage; InputError if it is
    none of these or its geometry is incomplete or contradictory."""
    geometry_given = any(x is not None for x in (spacing, origin, direction, affine))
    if isinstance(image, (list, tuple)):
        raise InputError(f"a Python {type(image).__name__} is not an image: give a numpy array (numpy.asarray(...)) "
                         "with spacing= (or affine=), a file path, or a SimpleITK or nibabel image")
    if isinstance(image, np.ndarray):
        check_array(image)
        if affine is not None:
            if any(x is not None for x in (spacing, origin, direction)):
                raise InputError("give either affine= or spacing= (with origin=, direction=), not both")
            return InputImage(_from_ras(image, affine), "(numpy array)", nibabel_order=True)
        if spacing is None:
            raise InputError("a numpy array needs its voxel size: spacing=(x, y, z) in mm (SimpleITK's order; the "
                             "array indexed [k, j, i]), or affine= (nibabel's 4x4 voxel-to-RAS matrix; the array "
                             "indexed [i, j, k])")
        return InputImage(_from_sitk_order(image, spacing, origin, direction), "(numpy array)")
    if geometry_given:
        raise InputError("spacing=, origin=, direction= and affine= are for numpy arrays only; this image carries "
                         "its own geometry")
    if isinstance(image, (str, Path)):
        return InputImage(read_image(Path(image)), str(image), path=Path(image))
    if isinstance(image, sitk.Image):
        return InputImage(image, "(SimpleITK image)")
    if _is_nibabel(image):
        name = image.get_filename() if hasattr(image, "get_filename") else None
        data = np.asanyarray(image.dataobj)
        while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1), as some tools write a volume: the volume
            data = data[..., 0]
        return InputImage(_from_ras(data, image.affine), name or "(nibabel image)", nibabel_order=True,
                          path=Path(name) if name else None)
    raise InputError(f"cannot segment a {type(image).__name__}: give a file path, a SimpleITK image, a nibabel "
                     "image, or a numpy array with spacing= (or affine=)")


def check_array(arr: np.ndarray, what: str = "the array") -> None:
    """InputError unless `arr` can be an MRI: 2 or 3 axes of real numbers (not booleans: that is a mask)."""
    if arr.ndim not in (2, 3):
        extra = (": a time series or several echoes? Give one volume (e.g. array[..., 0])"
                 if arr.ndim == 4 else "")
        raise InputError(f"{what} has {arr.ndim} axes (shape {arr.shape}); expected a 2D slice or a 3D volume{extra}")
    kind = arr.dtype.kind
    if kind == "b":
        raise InputError(f"{what} is boolean: a mask, not an MRI. Give the scan's intensities (a brain mask goes to "
                         "mask=)")
    if kind == "c":
        raise InputError(f"{what} is complex: give the magnitude image (numpy.abs) of the MRI")
    if kind not in "iuf":
        raise InputError(f"{what} holds {arr.dtype} values, not numbers: give the MRI's intensities as a numeric "
                         "array (e.g. array.astype(numpy.float32))")


def _is_nibabel(image: Any) -> bool:
    return type(image).__module__.startswith("nibabel") and hasattr(image, "dataobj") and hasattr(image, "affine")


def _from_sitk_order(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    arr = np.asarray(array)
    check_array(arr)
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)  # the pipeline works in float32; ITK has no float16 pixels
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    n = img.GetDimension()
    try:
        img.SetSpacing([float(x) for x in _values("spacing", spacing, n)])
        if origin is not None:
            img.SetOrigin([float(x) for x in _values("origin", origin, n)])
        if direction is not None:
            img.SetDirection([float(x) for x in _values("direction", direction, n * n)])
    except RuntimeError as e:  # ITK refuses a zero spacing or a singular direction
        raise InputError(f"the array's geometry is not valid ({str(e).strip().splitlines()[-1]})") from e
    return img


def _numbers(name: str, values: Any) -> np.ndarray:
    """`values` as a flat float array; InputError naming the argument if they are not numbers."""
    if isinstance(values, (str, bytes, dict, set)):
        raise InputError(f"{name}= must be numbers (got {values!r})")
    try:
        return np.asarray(values, float).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name}= must be numbers (got {values!r})") from None


def _values(name: str, values: Sequence[float], n: int) -> np.ndarray:
    v = _numbers(name, values)
    if v.size != n or not np.isfinite(v).all():
        raise InputError(f"{name}= must be {n} finite numbers for this {int(round(n ** 0.5)) if name == 'direction' else n}D "
                         f"array (got {[float(x) for x in v]})")
    if name == "spacing" and (v <= 0).any():
        raise InputError(f"spacing= must be more than 0 mm along every axis (got {list(v)})")
    return v


def _from_ras(data: Any, affine: Any) -> sitk.Image:
    """An [i, j, k]-indexed array with its voxel-to-RAS affine (nibabel's convention) as a SimpleITK image."""
    arr = np.asarray(data)
    check_array(arr, "the image's data" if not isinstance(data, np.ndarray) else "the array")
    a = _numbers("affine", affine)
    if a.size != 16 or not np.isfinite(a).all():
        raise InputError(f"affine= must be a finite 4x4 matrix (got {a.size} numbers)")
    lps = RAS_TO_LPS @ a.reshape(4, 4)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if (spacing <= 0).any():
        raise InputError("affine= has a zero column: every voxel axis needs a size")
    n = arr.ndim
    sp, org, d = spacing[:n], lps[:n, 3], (lps[:3, :3] / spacing)[:n, :n]
    return _from_sitk_order(np.transpose(arr), sp, org, d.reshape(-1))

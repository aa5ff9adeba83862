"""Moving images between a scan's own grid and the model grid, and back (pure SimpleITK/numpy).

Convention: `transform` maps physical points of the model grid to physical points of the
scan (ITK's fixed = model/template, moving = scan), which is what `registration.register_affine`
returns and what `sitk.Resample(scan, model_grid, transform)` needs. Going back uses its inverse.

The model grid is the aligned 160x192x224 1 mm space of the training data. Those files carry an
identity affine, but their voxel axes are anatomically FreeSurfer's conformed LIA order
(x -> left, y -> inferior, z -> anterior), so a scan in real scanner geometry can only be
registered to them once the template is given that anatomical direction: `model_grid`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

# ITK (LPS) direction of the aligned grid's voxel axes: x -> L, y -> I, z -> A (columns, row-major flat)
MODEL_DIRECTION_LIA = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0)

ArrayLike = Union[np.ndarray, sitk.Image]


def model_grid(template: sitk.Image) -> sitk.Image:
    """The template with its anatomical (LIA) direction, centred on physical 0; pixels shared unchanged.

    Only the header changes, so arrays on this grid are the training data's arrays as they are.
    """
    out = sitk.Image(template)
    out.SetDirection(MODEL_DIRECTION_LIA)
    out.SetOrigin((0.0, 0.0, 0.0))
    centre = out.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in out.GetSize()])
    out.SetOrigin(tuple(-c for c in centre))
    return out


def to_model_space(
    img: sitk.Image, template: sitk.Image, transform: sitk.Transform, interpolator: int = sitk.sitkLinear
) -> sitk.Image:
    """Resample a scan onto the template's grid through `transform` (model -> scan points).

    Linear interpolation for intensities (float32 out); pass sitk.sitkNearestNeighbor for labels
    (the pixel type is then kept). Outside the scan's field of view the value is 0.
    """
    out_type = sitk.sitkFloat32 if interpolator != sitk.sitkNearestNeighbor else img.GetPixelID()
    return sitk.Resample(img, template, transform, interpolator, 0.0, out_type)


def to_scan_space(
    probabilities_or_labels: ArrayLike,
    model_grid_reference: sitk.Image,
    scan_img: sitk.Image,
    transform: sitk.Transform,
) -> sitk.Image:
    """Labels on the scan's own grid (size, spacing, origin, direction exactly the scan's).

    Input on the model grid: per-class probabilities (C, z, y, x) -> each class is resampled
    linearly and the argmax taken; or integer labels (z, y, x) / a label image -> nearest neighbour.
    Memory stays bounded: one class at a time, in float32.
    """
    labels, _ = _to_scan_space(probabilities_or_labels, model_grid_reference, scan_img, transform, False)
    return labels


def to_scan_space_with_entropy(
    probabilities: np.ndarray, model_grid_reference: sitk.Image, scan_img: sitk.Image, transform: sitk.Transform
) -> Tuple[sitk.Image, sitk.Image]:
    """As `to_scan_space` for probabilities, plus their normalized entropy (float32 in [0, 1]) on the scan grid.

    The entropy is accumulated class by class from the resampled probabilities, so it costs one
    more float32 volume, not a stack of classes.
    """
    labels, entropy = _to_scan_space(probabilities, model_grid_reference, scan_img, transform, True)
    assert entropy is not None
    return labels, entropy


def entropy_map(probabilities: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Per-voxel entropy of class probabilities (C, ...) -> float32 (...): 0 certain, high uncertain.

    Natural log; with `normalize` divided by log(C), so 1 means all classes equally likely.
    Computed one class at a time in float32.
    """
    probs = np.asarray(probabilities)
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise ValueError(f"expected class probabilities of shape (C>=2, ...), got {probs.shape}")
    out = np.zeros(probs.shape[1:], dtype=np.float32)
    scratch = np.empty_like(out)
    for c in range(probs.shape[0]):
        _accumulate_entropy(out, np.asarray(probs[c], dtype=np.float32), scratch)
    if normalize:
        out /= np.float32(math.log(probs.shape[0]))
    return out


def _accumulate_entropy(acc: np.ndarray, p: np.ndarray, scratch: Optional[np.ndarray] = None) -> None:
    """acc -= p log p in place (0 log 0 = 0), using `scratch` (float32 like p) instead of new arrays."""
    buf = np.empty(p.shape, dtype=np.float32) if scratch is None else scratch
    np.clip(p, 1e-12, 1.0, out=buf)
    np.log(buf, out=buf)
    buf *= p
    acc -= buf


def _to_scan_space(
    data: ArrayLike, ref: sitk.Image, scan: sitk.Image, transform: sitk.Transform, want_entropy: bool
) -> Tuple[sitk.Image, Optional[sitk.Image]]:
    inverse = transform.GetInverse()  # scan points -> model points
    model_shape = tuple(reversed(ref.GetSize()))
    if isinstance(data, sitk.Image):
        if data.GetSize() != ref.GetSize():
            raise ValueError(f"labels of size {data.GetSize()} are not on the model grid {ref.GetSize()}")
        lab = sitk.Image(data)
        lab.CopyInformation(ref)
        return _nearest_labels(lab, scan, inverse), None
    arr = np.asarray(data)
    if arr.shape == model_shape:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError("a 3D input must hold integer labels; give probabilities as (C, z, y, x)")
        if want_entropy:
            raise ValueError("entropy needs class probabilities (C, z, y, x), not labels")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"labels must be in 0..255, got {arr.min()}..{arr.max()}")
        lab = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.uint8))
        lab.CopyInformation(ref)
        return _nearest_labels(lab, scan, inverse), None
    if arr.ndim != len(model_shape) + 1 or arr.shape[1:] != model_shape:
        raise ValueError(f"expected probabilities (C, {', '.join(map(str, model_shape))}) or labels "
                         f"{model_shape} on the model grid, got shape {arr.shape}")
    n_classes = arr.shape[0]
    if n_classes > 255:
        raise ValueError(f"{n_classes} classes do not fit uint8 labels")
    best: Optional[np.ndarray] = None
    labels = np.zeros(tuple(reversed(scan.GetSize())), dtype=np.uint8)
    entropy = np.zeros_like(labels, dtype=np.float32) if want_entropy else None
    scratch = np.empty_like(labels, dtype=np.float32) if want_entropy else None
    for c in range(n_classes):
        cls = sitk.GetImageFromArray(np.ascontiguousarray(arr[c], dtype=np.float32))
        cls.CopyInformation(ref)
        # outside the model grid: certainly background (class 0)
        resampled = sitk.Resample(cls, scan, inverse, sitk.sitkLinear, 1.0 if c == 0 else 0.0, sitk.sitkFloat32)
        del cls
        p = sitk.GetArrayViewFromImage(resampled)  # read-only view, no copy
        if best is None:
            best = p.copy()
        else:
            better = p > best
            labels[better] = c
            del better
            np.maximum(best, p, out=best)
        if entropy is not None and scratch is not None:
            _accumulate_entropy(entropy, p, scratch)
        del p, resampled
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(scan)
    if entropy is None:
        return out, None
    entropy /= np.float32(math.log(n_classes))
    ent = sitk.GetImageFromArray(entropy)
    ent.CopyInformation(scan)
    return out, ent


def _nearest_labels(lab: sitk.Image, scan: sitk.Image, inverse: sitk.Transform) -> sitk.Image:
    out = sitk.Resample(lab, scan, inverse, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    out.CopyInformation(scan)
    return out


# ---- test geometries: the same voxels under oblique, flipped, anisotropic headers ----


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """3x3 rotation about x, then y, then z (degrees): R = Rz @ Ry @ Rx."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_direction(angles_deg: Sequence[float], flip: Sequence[bool] = (False, False, False)) -> Tuple[float, ...]:
    """An ITK direction (row-major 9-tuple): a rotation whose voxel axes may be flipped (e.g. LPS <-> RAS)."""
    d = rotation_matrix(angles_deg) @ np.diag([-1.0 if f else 1.0 for f in flip])
    return tuple(float(v) for v in d.ravel())


def with_geometry(
    img: sitk.Image,
    direction: Optional[Sequence[float]] = None,
    spacing: Optional[Sequence[float]] = None,
    origin: Optional[Sequence[float]] = None,
) -> sitk.Image:
    """A copy of `img` with the same voxels under a new header (what an oblique/flipped scan looks like)."""
    out = sitk.Image(img)
    if direction is not None:
        out.SetDirection(tuple(float(v) for v in direction))
    if spacing is not None:
        out.SetSpacing(tuple(float(v) for v in spacing))
    if origin is not None:
        out.SetOrigin(tuple(float(v) for v in origin))
    return out


def centre_of(img: sitk.Image) -> np.ndarray:
    """Physical centre of an image's grid (mm)."""
    return np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in img.GetSize()]))


def centred_affine(
    model: sitk.Image, scan: sitk.Image, angles_deg: Sequence[float] = (0, 0, 0), shift_mm: Sequence[float] = (0, 0, 0)
) -> sitk.AffineTransform:
    """A model -> scan transform: rotate about the model's centre, land on the scan's centre, then shift."""
    t = sitk.AffineTransform(3)
    t.SetCenter(tuple(centre_of(model)))
    t.SetMatrix(tuple(float(v) for v in rotation_matrix(angles_deg).ravel()))
    t.SetTranslation(tuple(float(v) for v in centre_of(scan) - centre_of(model) + np.asarray(shift_mm, float)))
    return t


# ---- physical points -> model coordinates (the INR's [-1, 1] space) ----


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 homogeneous matrix of an affine-type SimpleITK transform (point -> point)."""
    t = sitk.AffineTransform(transform) if not isinstance(transform, sitk.AffineTransform) else transform
    a = np.array(t.GetMatrix(), float).reshape(3, 3)
    c = np.array(t.GetCenter(), float)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = np.array(t.GetTranslation(), float) + c - a @ c
    return m


def physical_to_model(
    reference: sitk.Image, canvas: Sequence[int], offset: Sequence[int] = (0, 0, 0),
    transform: Optional[sitk.Transform] = None,
) -> np.ndarray:
    """4x4 matrix taking physical points (LPS mm) to model coordinates in [-1, 1] (array axis order).

    `reference` is the image whose array was placed on the model canvas at `offset` (array order).
    With `transform` (model-grid points -> scan points, as registration returns) the points are
    the scan's and `reference` is the model grid. Every step is affine, so one matrix serves any
    point: a scan's voxel centres, a plane, a super-resolved grid.
    """
    d = np.array(reference.GetDirection(), float).reshape(3, 3)
    sp = np.array(reference.GetSpacing(), float)
    o = np.array(reference.GetOrigin(), float)
    to_index = np.eye(4)  # physical -> continuous ITK index (x, y, z)
    to_index[:3, :3] = np.diag(1.0 / sp) @ np.linalg.inv(d)
    to_index[:3, 3] = -to_index[:3, :3] @ o
    to_coords = np.zeros((4, 4))  # ITK index (x, y, z) -> array order (z, y, x) -> [-1, 1]
    to_coords[3, 3] = 1.0
    for a in range(3):
        n = canvas[a]
        scale = 2.0 / max(n - 1, 1)
        to_coords[a, 2 - a] = scale
        to_coords[a, 3] = offset[a] * scale - 1.0
    m = to_coords @ to_index
    if transform is not None:
        m = m @ np.linalg.inv(affine_matrix(transform))
    return m

"""Reading and checking input images; writing outputs atomically and never over existing files.

Images are SimpleITK images throughout, so that size, spacing, origin and direction travel
with the pixels and the output can be written in exactly the input's geometry.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import INPUT_FORMATS, InputError  # noqa: F401 (readers.InputError, readers.INPUT_FORMATS)
from .metaimage_check import check_metaimage_complete
from .nifti_check import (FORM_DISAGREEMENT_MM, TruncatedError, check_nifti_complete, corners, count_nonfinite_nifti,
                          nifti_forms)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def read_image(path: Path, series_id: Optional[str] = None) -> sitk.Image:
    """Read an image: NIfTI, NRRD, MHA/MHD, FreeSurfer .mgz/.mgh, or a DICOM series.

    A DICOM series is given as its folder (one series in it, or pick one with `series_id`)
    or as any one of its files. Every failure becomes an InputError naming the file and the
    problem, so the user sees why instead of a traceback.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        return _read_dicom(path, series_id)
    if path.stat().st_size == 0:
        raise InputError(f"input {path} is an empty file")
    name = path.name.lower()
    if name.endswith(MGH_SUFFIXES):
        from .mgz import MGHError, read_mgh

        try:
            return _finite(read_mgh(path), path)
        except MGHError as e:
            raise InputError(str(e)) from e
    if name.endswith(".dcm") or series_id is not None:
        return _read_dicom(path.parent, series_id, member=path)
    try:
        check_nifti_complete(path)  # ITK would fill a cut-off NIfTI with zeros
        check_metaimage_complete(path)  # ITK calls a cut-off MetaImage "No such file or directory"
        nonfinite = count_nonfinite_nifti(path)  # ITK reads NaN in a NIfTI as 0, without a word
    except TruncatedError as e:
        raise InputError(str(e)) from e
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise InputError(f"cannot read {path} as an image ({first}); supported: {INPUT_FORMATS}") from e
    img = _finite(img, path, nonfinite)
    note = form_disagreement(path, img)
    if note:
        img.SetMetaData(HEADER_NOTE_KEY, note)
    return img


HEADER_NOTE_KEY = "metaseg_header_note"


def _read_dicom(folder: Path, series_id: Optional[str], member: Optional[Path] = None) -> sitk.Image:
    """One checked DICOM series (dicom.py) with NaN/Inf handled, carrying its SeriesInstanceUID and nothing else
    of its headers (no patient identity)."""
    from .dicom import SERIES_UID_KEY, read_dicom_series

    image, uid = read_dicom_series(folder, series_id, member)
    image = _finite(image, member or folder)
    image.SetMetaData(SERIES_UID_KEY, uid)
    return image


def form_disagreement(path: Path, img: sitk.Image) -> Optional[str]:
    """A warning if the NIfTI header's qform and sform put the voxels more than FORM_DISAGREEMENT_MM apart,
    saying which one ITK used (the brain's position, hence the registration's start, depends on it)."""
    forms = nifti_forms(path)
    if forms is None:
        return None
    q, s, size = forms
    cq, cs = corners(q, size), corners(s, size)
    apart = float(np.linalg.norm(cq - cs, axis=1).max())
    if apart <= FORM_DISAGREEMENT_MM:
        return None
    lps = np.array([img.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]) for i in (0, size[0] - 1)
                    for j in (0, size[1] - 1) for k in (0, size[2] - 1)]) if img.GetDimension() == 3 else None
    used = "one of them"
    if lps is not None:
        ras = lps * np.array([-1.0, -1.0, 1.0])
        used = "the sform" if np.abs(ras - cs).max() <= np.abs(ras - cq).max() else "the qform"
    return (f"the NIfTI header's qform and sform disagree (the voxels lie up to {apart:.1f} mm apart under the two); "
            f"{used} was used. If the brain's position or orientation looks wrong, fix the header (e.g. make both "
            "forms equal in Slicer or with nibabel) and run again")


def image_dims(img: sitk.Image) -> int:
    """2 for a slice (a 3D image with one slice counts as 2D), 3 for a volume; refuse anything else, and an image
    whose voxel size no brain MRI has (`check_voxel_size`)."""
    _check_scalar(img)
    size = img.GetSize()
    if img.GetDimension() not in (2, 3):
        raise InputError(f"the input is {img.GetDimension()}D (size {size}); expected a 2D slice or a 3D volume")
    check_voxel_size(img)
    return 2 if img.GetDimension() == 2 or 1 in size else 3


# Voxel sizes of brain MRI: ex-vivo scans reach 0.1 mm, clinical slices 5-10 mm. Outside this range the header's
# geometry is wrong, e.g. the NIfTI units field says microns or metres on a scan of 1 mm voxels (ITK, as the NIfTI
# standard says, then reads 0.001 mm or 1000 mm voxels): no brain fits in the field of view, or one would be metres wide.
MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 30.0
# NIfTI-1/2 xyzt_units & 7: the unit of pixdim (ITK converts to mm; 0 = unknown, read as mm)
NIFTI_SPACE_UNITS = {1: "metres", 2: "millimetres", 3: "microns"}


def check_voxel_size(img: sitk.Image) -> None:
    """Refuse an image whose voxels (along its axes of more than one voxel) lie outside MIN_VOXEL_MM..MAX_VOXEL_MM,
    naming the voxel size, the field of view and, for a NIfTI file, the unit its header gives."""
    size, spacing = img.GetSize(), img.GetSpacing()
    used = [k for k, n in enumerate(size) if n > 1]
    fov = [size[k] * spacing[k] for k in used]
    if all(MIN_VOXEL_MM <= spacing[k] <= MAX_VOXEL_MM for k in used):
        return
    voxels = " x ".join(f"{spacing[k]:.3g}" for k in used)
    view = " x ".join(f"{f:.3g}" for f in fov)
    what = (f"the input's voxels are {voxels} mm, a field of view of {view} mm: "
            + ("no brain fits in it" if min(spacing[k] for k in used) < MIN_VOXEL_MM else "that is not the size of a head"))
    unit = _nifti_unit(img)
    if unit is not None and unit != "millimetres":
        fix = (f". Its NIfTI header gives the voxel sizes in {unit} (xyzt_units), which the NIfTI standard (and ITK) "
               f"convert to mm; if the voxels are really {_plain(img, used)} mm, set the header's units to mm (e.g. "
               "nibabel: img.header.set_xyzt_units('mm')) and run again")
    else:
        fix = (f". Brain MRI has voxels of {MIN_VOXEL_MM:g}-{MAX_VOXEL_MM:g} mm: fix the voxel size (spacing) in the "
               "image's header and run again")
    raise InputError(what + fix)


def _nifti_unit(img: sitk.Image) -> Optional[str]:
    """The spatial unit a NIfTI header gave (ITK keeps its xyzt_units field), or None for other files."""
    if not img.HasMetaDataKey("xyzt_units"):
        return None
    try:
        return NIFTI_SPACE_UNITS.get(int(img.GetMetaData("xyzt_units").strip()) & 7)
    except ValueError:
        return None


def _plain(img: sitk.Image, used: List[int]) -> str:
    """The header's voxel sizes as written (pixdim), before ITK's unit conversion."""
    try:
        return " x ".join(f"{float(img.GetMetaData(f'pixdim[{k + 1}]')):g}" for k in used)
    except (RuntimeError, ValueError):
        return "1"


def image_array_2d(img: sitk.Image) -> np.ndarray:
    """The pixels of a 2D image (or a 3D image with one slice) as a float32 (rows, cols) array.

    Refuses what a 2D model cannot segment, saying what was found: vector/RGB pixels, volumes
    with several slices, 4D images, NaN/Inf values, empty or constant images.
    """
    _check_scalar(img)
    size = img.GetSize()
    if img.GetDimension() > 3:
        raise InputError(f"the input is {img.GetDimension()}D (size {size}); expected one 2D slice")
    if img.GetDimension() == 3 and sorted(size)[0] != 1:
        raise InputError(
            f"the input is a 3D volume of size {size}; the 2D weights expect one slice (e.g. 160x192x1). "
            "Extract a coronal slice or use 3D weights"
        )
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr = arr.reshape([s for s in arr.shape if s != 1] or [1])
    if arr.ndim != 2:
        raise InputError(f"the input has size {size}; expected a 2D slice")
    _check_values(arr)
    return arr


# NaN/Inf voxels read from a file become 0 (background: no label there), and the count travels with the image
# under this key so that the run warns about it (`input_warnings`): a NaN background (common after resampling
# by other tools) is harmless, NaN inside the brain leaves a hole that the user must hear about.
NONFINITE_KEY = "metaseg_nonfinite_voxels"


def _finite(img: sitk.Image, path: Path, nonfinite: int = 0) -> sitk.Image:
    """`img` with NaN/Inf voxels set to 0 and their count recorded; complex voxels refused first."""
    _check_voxel_type(img, path)
    if img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayFromImage(img)
        bad = ~np.isfinite(arr)
        if bad.any():
            nonfinite += int(bad.sum())
            arr[bad] = 0
            clean = sitk.GetImageFromArray(arr)
            clean.CopyInformation(img)
            img = clean
    if nonfinite:
        img.SetMetaData(NONFINITE_KEY, str(nonfinite))
    return img


def input_warnings(img: sitk.Image) -> List[str]:
    """What reading the file decided that the user must know: NaN/Inf voxels read as background, which of two
    disagreeing header geometries was used."""
    out = [img.GetMetaData(HEADER_NOTE_KEY)] if img.HasMetaDataKey(HEADER_NOTE_KEY) else []
    if img.HasMetaDataKey(NONFINITE_KEY):
        n = int(img.GetMetaData(NONFINITE_KEY))
        share = 100.0 * n / max(1, int(np.prod(img.GetSize())))
        out.append(f"the input has {n} NaN or infinite voxels ({share:.2g}% of the image); they were treated as "
                   "background (0): they get no label and the fit does not see them. If they lie inside the brain, "
                   "fix the scan")
    return out


def _check_voxel_type(img: sitk.Image, path: Optional[Path] = None) -> None:
    """Complex voxels (MR raw data, phase images) cannot be cast to intensities: refuse them by name."""
    if "complex" in img.GetPixelIDTypeAsString().lower():
        what = f"input {path}" if path is not None else "the input"
        raise InputError(f"{what} has complex voxels ({img.GetPixelIDTypeAsString()}): expected a magnitude T1 image "
                         "with real grey levels; take the magnitude (abs) of the complex image first")


def _check_scalar(img: sitk.Image) -> None:
    _check_voxel_type(img)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"the input has {img.GetNumberOfComponentsPerPixel()} components per pixel (vector/RGB); "
            "expected a scalar grey-level MRI"
        )


def _check_values(arr: np.ndarray) -> None:
    if arr.size == 0:
        raise InputError("the input has no pixels")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(f"the input has {int(bad.sum())} NaN or infinite values; fix or mask them first")
    if float(arr.max()) == float(arr.min()):
        raise InputError(f"the input is constant (every pixel is {float(arr.min())}); expected a brain MRI")
    if float(arr.max()) <= 0:
        raise InputError("the input has no positive pixels; expected a skull-stripped brain MRI with brain > 0")
    lo, hi = float(arr.min()), float(arr.max())
    if not np.count_nonzero((arr != lo) & (arr != hi)):
        raise InputError(f"the input holds only two values ({lo:g} and {hi:g}): a mask or a binary image, not an MRI; "
                         "give the scan's intensities (a brain mask goes to --mask)", reason="binary_image")


def labels_like(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A uint8 label image with exactly `reference`'s size, spacing, origin and direction."""
    arr = np.ascontiguousarray(labels.astype(np.uint8).reshape(sitk.GetArrayViewFromImage(reference).shape))
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(reference)
    return out


def sitk_array(img: sitk.Image) -> np.ndarray:
    """A copy of an image's voxels in (z, y, x) order."""
    return sitk.GetArrayFromImage(img)


def write_image(img: sitk.Image, path: Path) -> None:
    sitk.WriteImage(img, str(path), True)


def same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> Tuple[bool, Optional[str]]:
    """Whether two images share size, spacing, origin and direction; if not, what differs."""
    if a.GetSize() != b.GetSize():
        return False, f"size {a.GetSize()} vs {b.GetSize()}"
    for what in ("GetSpacing", "GetOrigin", "GetDirection"):
        x, y = np.array(getattr(a, what)()), np.array(getattr(b, what)())
        if not np.allclose(x, y, atol=tol):
            return False, f"{what[3:].lower()} {tuple(x)} vs {tuple(y)}"
    return True, None


# ---- 3D inputs: more formats (MGZ, DICOM series) and the checks of a volume ----

MGH_SUFFIXES = (".mgz", ".mgh", ".mgh.gz")
MIN_SIDE_3D = 32  # voxels; smaller volumes cannot hold a brain at any usual resolution


def image_array_3d(img: sitk.Image) -> np.ndarray:
    """The voxels of a 3D volume as a float32 array in SimpleITK (z, y, x) order.

    Refuses what a 3D pipeline cannot segment, saying what was found and what is expected:
    vector/RGB pixels, 4D images, 2D slices, empty or tiny volumes, NaN/Inf, constant images.
    """
    _check_scalar(img)
    size = img.GetSize()
    if img.GetDimension() > 3:
        raise InputError(
            f"the input is {img.GetDimension()}D (size {size}), e.g. a time series or several echoes; "
            "expected one 3D volume: extract a single volume first"
        )
    if 0 in size:
        raise InputError(f"the input is empty (size {size}); expected a 3D brain volume")
    if img.GetDimension() == 2 or 1 in size:
        raise InputError(
            f"the input is a 2D slice (size {size}); the 3D pipeline expects a volume (e.g. 256x256x176 voxels); "
            "use the 2D weights for a single slice"
        )
    if min(size) < MIN_SIDE_3D:
        raise InputError(
            f"the input volume is too small (size {size}); expected at least {MIN_SIDE_3D} voxels along every axis"
        )
    check_voxel_size(img)
    arr = sitk.GetArrayFromImage(img)
    arr = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    _check_values(arr)
    return arr

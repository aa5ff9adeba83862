"""Reading and checking input images; writing outputs atomically and never over existing files.

Images are SimpleITK images throughout, so that size, spacing, origin and direction travel
with the pixels and the output can be written in exactly the input's geometry.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .nifti_check import (FORM_DISAGREEMENT_MM, TruncatedError, check_nifti_complete, corners, count_nonfinite_nifti,
                          nifti_forms)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


class InputError(ValueError):
    """The input is missing, unreadable or not an image this model can segment; the message says why.

    The message is the command line's (it may name options such as --mask). A refusal that a program
    words for its own users (the Slicer panel) also carries `reason`, a stable name of what was refused,
    and `facts`, the numbers the message quotes; `metaseg segment --progress json` sends both with its
    error event. The reasons: see REASONS in progress.py.
    """

    def __init__(self, message: str, reason: Optional[str] = None, **facts):
        super().__init__(message)
        self.reason = reason
        self.facts = facts


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
        return _finite(_read_dicom_series(path, series_id), path)
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
        return _finite(_read_dicom_series(path.parent, series_id, member=path), path)
    try:
        check_nifti_complete(path)  # ITK would fill a cut-off NIfTI with zeros
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
    """2 for a slice (a 3D image with one slice counts as 2D), 3 for a volume; refuse anything else."""
    _check_scalar(img)
    size = img.GetSize()
    if img.GetDimension() == 2:
        return 2
    if img.GetDimension() == 3:
        return 2 if 1 in size else 3
    raise InputError(f"the input is {img.GetDimension()}D (size {size}); expected a 2D slice or a 3D volume")


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
INPUT_FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), FreeSurfer (.mgz, .mgh), " \
    "a DICOM series folder"
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
    arr = sitk.GetArrayFromImage(img)
    arr = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    _check_values(arr)
    return arr


class _QuietITK:
    """Silence ITK's console warnings (GDCM prints them for every non-DICOM file) for a block."""

    def __enter__(self) -> None:
        self._was = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)

    def __exit__(self, *exc) -> None:
        sitk.ProcessObject.SetGlobalWarningDisplay(self._was)


def dicom_series(folder: Path) -> List[Tuple[str, int, str]]:
    """The DICOM series in a folder: (series id, number of files, description) for each."""
    out = []
    with _QuietITK():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        for sid in ids:
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
            out.append((sid, len(files), _dicom_tag(files[0], "0008|103e") if files else ""))
    return out


def _dicom_tag(file: str, tag: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
    except RuntimeError:
        return ""


def _read_dicom_series(folder: Path, series_id: Optional[str], member: Optional[Path] = None) -> sitk.Image:
    """Read one DICOM series of `folder`: the only one, the one named, or the one holding `member`."""
    series = dicom_series(folder)
    where = member if member is not None else folder
    if not series:
        what = f"{where}: no DICOM series in {folder}" if member else f"{where} is a folder with no DICOM series"
        raise InputError(f"input {what}; give an image file or a folder of one DICOM series "
                         f"(supported: {INPUT_FORMATS})")
    with _QuietITK():
        files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid, _, _ in series}
    if series_id is None and member is not None:
        owner = [sid for sid, names in files.items() if any(Path(n).resolve() == member.resolve() for n in names)]
        series_id = owner[0] if owner else None
        if series_id is None:
            raise InputError(f"input {member}: not part of a readable DICOM series in {folder}")
    if series_id is None:
        if len(series) > 1:
            listing = "; ".join(f"{sid} ({n} files{', ' + d if d else ''})" for sid, n, d in series)
            raise InputError(f"input {folder} holds {len(series)} DICOM series: {listing}. "
                             "Choose one (series id) or put each series in its own folder")
        series_id = series[0][0]
    if series_id not in files:
        raise InputError(f"input {folder}: no DICOM series {series_id!r}; found: {', '.join(files)}")
    check_slice_positions(files[series_id], f"the DICOM series {series_id} in {folder}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[series_id])
    try:
        with _QuietITK():
            return reader.Execute()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise InputError(f"cannot read the DICOM series {series_id} in {folder} ({first})") from e


# Slice positions of a DICOM series may deviate from even spacing by this share of the median step (scanners
# round positions to ~1e-4 mm); beyond it ITK would still stack the slices evenly, stretching the anatomy.
SLICE_STEP_TOLERANCE = 0.02


def check_slice_positions(files: List[str], what: str) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal: missing slices (a file absent,
    or one GDCM skipped as unreadable or truncated), uneven spacing, or two slices at one position."""
    if len(files) < 3:
        return
    positions, normal = [], None
    with _QuietITK():
        for f in files:
            reader = sitk.ImageFileReader()
            reader.SetFileName(f)
            try:
                reader.ReadImageInformation()
                ipp = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
                if normal is None:
                    iop = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
                    normal = np.cross(iop[:3], iop[3:6])
            except (RuntimeError, ValueError, IndexError):
                return  # no usable position tags (e.g. secondary captures): ITK's own reading decides
            positions.append(float(np.dot(ipp, normal)))
    order = np.argsort(positions)
    steps = np.diff(np.asarray(positions)[order])
    step = float(np.median(steps))
    if step <= 1e-6:
        raise InputError(f"{what}: most of its {len(files)} slices share one position (a multi-volume series, e.g. "
                         "several echoes or time points?); export one volume per series")
    off = np.abs(steps - step) > SLICE_STEP_TOLERANCE * step
    if not off.any():
        return
    gaps = steps[off]
    names = lambda k: f"{Path(files[order[k]]).name} and {Path(files[order[k + 1]]).name}"  # noqa: E731
    k = int(np.flatnonzero(off)[0])
    if (gaps <= 1e-6).any():
        raise InputError(f"{what}: two slices at the same position ({names(k)}): a duplicate file or two series "
                         "mixed? Remove the extra files")
    missing = np.round(gaps / step) - 1
    if (missing >= 1).all() and np.allclose(gaps, (missing + 1) * step, rtol=SLICE_STEP_TOLERANCE):
        raise InputError(f"{what}: about {int(missing.sum())} slice(s) are missing (the slices are {step:.3g} mm apart, "
                         f"but {len(gaps)} gap(s) are wider, the first {gaps[0]:.3g} mm between {names(k)}; a file "
                         "absent, or one unreadable or truncated). Nothing was segmented: get the complete series")
    raise InputError(f"{what}: its slices are unevenly spaced ({steps.min():.3g} to {steps.max():.3g} mm, median "
                     f"{step:.3g} mm; first at {names(k)}). Reading it as evenly spaced would distort the anatomy: "
                     "resample it onto a regular grid (e.g. dcm2niix, then segment the NIfTI)")

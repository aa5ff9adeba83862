"""DICOM series: find them, check them, read one as a volume.

A series is read only when it is one scan of one patient: its slices evenly spaced along their normal (a missing or
truncated slice file, uneven spacing or a duplicate would otherwise be stacked evenly by ITK and stretch the
anatomy), and every slice of the same patient (two patients' slices under one SeriesInstanceUID are two scans
mixed up). Patient identity is compared, never kept: the image read carries only its SeriesInstanceUID
(`SERIES_UID_KEY`), which the report records so that a result can be traced to its series.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import INPUT_FORMATS, InputError

# the image's metadata key holding the series' SeriesInstanceUID (0020,000E)
SERIES_UID_KEY = "metaseg_dicom_series_uid"
# tags read from every slice's header
TAGS = {"position": "0020|0032", "orientation": "0020|0037", "patient_name": "0010|0010", "patient_id": "0010|0020",
        "series_uid": "0020|000e"}
# Slice positions of a DICOM series may deviate from even spacing by this share of the median step (scanners
# round positions to ~1e-4 mm); beyond it ITK would still stack the slices evenly, stretching the anatomy.
SLICE_STEP_TOLERANCE = 0.02


class _QuietITK:
    """Silence ITK's console warnings (GDCM prints them for every non-DICOM file) for a block."""

    def __enter__(self) -> None:
        self._was = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)

    def __exit__(self, *exc) -> None:
        sitk.ProcessObject.SetGlobalWarningDisplay(self._was)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after its 128-byte preamble (4 bytes read)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def holds_dicom(folder: Path) -> bool:
    """Whether `folder` itself (not its subfolders) holds a DICOM file."""
    try:
        return any(f.is_file() and is_dicom_file(f) for f in sorted(Path(folder).iterdir()))
    except OSError:
        return False


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


def read_dicom_series(folder: Path, series_id: Optional[str], member: Optional[Path] = None) -> Tuple[sitk.Image, str]:
    """Read one DICOM series of `folder` (the only one, the one named, or the one holding `member`) after
    `check_series`: (image, its SeriesInstanceUID)."""
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
            listing = "; ".join(f"{sid} ({n} files{', ' + d if d else ''}, e.g. {Path(files[sid][0]).name})"
                                for sid, n, d in series)
            raise InputError(f"input {folder} holds {len(series)} DICOM series: {listing}. Give one file of the series "
                             "to segment instead of the folder (its series is read; in a batch manifest too), or put "
                             "each series in its own folder")
        series_id = series[0][0]
    if series_id not in files:
        raise InputError(f"input {folder}: no DICOM series {series_id!r}; found: {', '.join(files)}")
    headers = slice_headers(files[series_id])
    check_series(files[series_id], headers, f"the DICOM series {series_id} in {folder}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[series_id])
    try:
        with _QuietITK():
            image = reader.Execute()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise InputError(f"cannot read the DICOM series {series_id} in {folder} ({first})") from e
    uids = {h.get("series_uid", "") for h in headers if h} - {""}
    return image, (uids.pop() if len(uids) == 1 else series_id)


def slice_headers(files: List[str]) -> List[Dict[str, str]]:
    """The TAGS of each file ({} for a file whose header cannot be read)."""
    out = []
    with _QuietITK():
        for f in files:
            reader = sitk.ImageFileReader()
            reader.SetFileName(f)
            try:
                reader.ReadImageInformation()
            except RuntimeError:
                out.append({})
                continue
            out.append({k: reader.GetMetaData(t).strip() for k, t in TAGS.items() if reader.HasMetaDataKey(t)})
    return out


def check_series(files: List[str], headers: List[Dict[str, str]], what: str) -> None:
    """Refuse a series of several patients or with unevenly spaced slices (InputError, saying what to do)."""
    check_one_patient(files, headers, what)
    check_slice_positions(files, headers, what)


def check_one_patient(files: List[str], headers: List[Dict[str, str]], what: str) -> None:
    """Refuse a series whose slices name more than one patient (PatientName or PatientID differ). The message
    names files, never patients: it reaches terminals, logs and batch tables."""
    for key, tag in (("patient_id", "PatientID"), ("patient_name", "PatientName")):
        seen: Dict[str, int] = {}
        for k, h in enumerate(headers):
            if h:  # a header that could not be read is judged by the reader, not counted as a patient
                seen.setdefault(h.get(key, ""), k)
        if len(seen) > 1:
            first, other = sorted(seen.values())[:2]
            raise InputError(f"{what}: its slices belong to {len(seen)} different patients (their {tag} differs, e.g. "
                             f"{Path(files[first]).name} and {Path(files[other]).name}): two patients' scans mixed in "
                             "one series. Nothing was segmented: put each patient's slices in a folder of their own")


def check_slice_positions(files: List[str], headers: List[Dict[str, str]], what: str) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal: missing slices (a file absent,
    or one GDCM skipped as unreadable or truncated), uneven spacing, or two slices at one position."""
    if len(files) < 3:
        return
    positions, normal = [], None
    for h in headers:
        try:
            ipp = [float(v) for v in h["position"].split("\\")]
            if normal is None:
                iop = [float(v) for v in h["orientation"].split("\\")]
                normal = np.cross(iop[:3], iop[3:6])
        except (KeyError, ValueError, IndexError):
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


def series_record(image: sitk.Image) -> Dict[str, str]:
    """The report's trace of a DICOM input: its SeriesInstanceUID only ({} for other inputs)."""
    if not image.HasMetaDataKey(SERIES_UID_KEY):
        return {}
    return {"series_instance_uid": image.GetMetaData(SERIES_UID_KEY)}

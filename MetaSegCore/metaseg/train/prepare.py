"""Training packs from labelled scans in any geometry (`metaseg prepare`).

A lab's labelled scans become training data the way a user's scan becomes a model input: each
scan takes the one path into the model's space that `segment` takes (`volume.register_to_template`,
the same template and the same registration gate; scans already on the model grid are used as
they are). With that one transform the image is resampled linearly and the labels by nearest
neighbour onto the model grid, so image and labels stay in register. The pack (`data.write_pack`)
is what `metaseg train --data` reads, 2D (coronal slices of it) and 3D alike.

A subject that cannot be trained on is refused with the reason: unreadable files, image and labels
on different grids, no labels, label values outside the model's classes, or a registration below
the gate. By default one refusal writes no pack at all (`skip_refused` leaves those subjects out).
"""
from __future__ import annotations

import csv
import glob
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..io.data import LabeledImage
from ..labelsets import TISSUES, LabelSet
from ..space.geometry import affine_matrix, to_model_space
from ..io.readers import InputError, image_array_3d, read_image, same_geometry
from ..space.volume import is_model_grid, model_reference, register_to_template
from ..io.spreadsheet import quote

MIN_LABELLED_ML = 100.0  # a brain has ~1000 mL of tissue; far less means the labels are not a brain's


@dataclass
class Subject:
    """One labelled scan: an id, the image file and the label file (same grid)."""

    id: str
    image: Path
    labels: Path


@dataclass
class PreparedSubject:
    """A subject on the model grid, or the reason it was refused (`error`)."""

    id: str
    volume: Optional[LabeledImage] = None
    qc: Dict[str, object] = field(default_factory=dict)
    error: str = ""


def find_subjects(folders: Sequence[Path], image_glob: str, labels_glob: str) -> List[Subject]:
    """One Subject per folder: the single file matching each glob inside it (id: the folder's name)."""
    out = []
    for d in folders:
        d = Path(d)
        if not d.is_dir():
            raise InputError(f"{d} is not a folder: give one folder per subject, holding its image and its labels")
        found = []
        for pattern, what in ((image_glob, "image"), (labels_glob, "labels")):
            hits = sorted(glob.glob(str(d / pattern)))
            if len(hits) != 1:
                raise InputError(f"{d}: expected exactly one {what} file matching {pattern!r}, found {len(hits)}"
                                 f"{' (' + ', '.join(Path(h).name for h in hits) + ')' if hits else ''}; "
                                 f"set --{what}-glob")
            found.append(Path(hits[0]))
        out.append(Subject(d.name, found[0], found[1]))
    ids = [s.id for s in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"subject folders with the same name: {', '.join(dup)}; names identify subjects in the pack")
    return out


def class_volumes_ml(labels: np.ndarray, voxel_ml: float, label_set: LabelSet = TISSUES) -> List[float]:
    """Volume in mL of each foreground label of `label_set`, in its order."""
    counts = np.bincount(labels.reshape(-1), minlength=256)
    return [round(float(counts[v]) * voxel_ml, 1 if label_set is TISSUES else 2) for v in label_set.foreground]


def prepare_subject(subj: Subject, canvas: Sequence[int], label_set: LabelSet = TISSUES) -> PreparedSubject:
    """Bring one labelled scan onto the model grid; a PreparedSubject with `error` set if refused."""
    try:
        return _prepare(subj, canvas, label_set)
    except (InputError, RuntimeError, OSError, ValueError) as e:  # ITK read errors are RuntimeErrors
        return PreparedSubject(subj.id, error=str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)


def _prepare(subj: Subject, canvas: Sequence[int], label_set: LabelSet) -> PreparedSubject:
    scan = read_image(subj.image)
    labels = read_image(subj.labels)
    ok, why = same_geometry(labels, scan, tol=1e-4)
    if not ok:
        raise InputError(f"the labels are not on the image's grid ({why}): resample them onto the image first")
    arr = image_array_3d(scan)
    lab = sitk.GetArrayFromImage(labels)
    if not np.issubdtype(lab.dtype, np.integer) and not np.array_equal(lab, np.round(lab)):
        raise InputError(f"{subj.labels.name} holds non-integer values: expected a label image")
    bad = sorted(int(v) for v in np.unique(lab) if int(v) not in label_set.values)
    if bad:
        known = ", ".join(f"{lab.value} {lab.name}" for lab in label_set.labels[:6])
        raise InputError(f"{subj.labels.name} has label values {bad[:5]} outside the {label_set.name} label set "
                         f"({known}, ...): map your labels to these values first, or choose another --label-set")
    voxel_ml = float(np.prod(scan.GetSpacing())) / 1000.0
    before = class_volumes_ml(lab.astype(np.uint8), voxel_ml, label_set)
    if sum(before) < MIN_LABELLED_ML:
        raise InputError(f"only {sum(before):.0f} mL of the scan is labelled (a brain: ~1000 mL): is "
                         f"{subj.labels.name} an unlabelled or empty label image?")
    if not (arr > 0).any():
        raise InputError("the image has no voxel above 0: expected a skull-stripped T1 (background 0)")
    work = sitk.GetImageFromArray(arr)
    work.CopyInformation(scan)
    labels = sitk.Cast(labels, sitk.sitkUInt8)
    qc: Dict[str, object] = {"image": str(subj.image), "labels": str(subj.labels), "ml_before": before}
    if is_model_grid(scan, canvas):  # as `segment` does: the model grid's own files are used as they are
        model_img, model_lab, det = arr, lab.astype(np.uint8), 1.0
        qc.update(registered=False)
    else:
        transform, reg = register_to_template(work)
        qc.update(registered=True, ncc=round(reg["ncc"], 3), ncc_interior=round(reg["ncc_interior"], 3))
        if not reg["ok"]:
            raise InputError(f"registration to the model's template failed its gate (NCC {reg['ncc']:.2f} in the "
                             f"brain, {reg['ncc_interior']:.2f} in its interior): is it a skull-stripped T1 with a "
                             "correct orientation header?")
        reference = model_reference(canvas)
        model_img = sitk.GetArrayFromImage(to_model_space(work, reference, transform))
        model_img[model_img < 0] = 0
        model_lab = sitk.GetArrayFromImage(to_model_space(labels, reference, transform, sitk.sitkNearestNeighbor))
        matrix = affine_matrix(transform)
        qc["model_to_scan"] = matrix.tolist()  # 4x4, LPS mm, full precision: re-applying it must give the same voxels
        det = abs(float(np.linalg.det(matrix[:3, :3])))  # scan mm^3 per model mm^3
    model_lab = np.where(model_img > 0, model_lab, 0).astype(np.uint8)  # training sees brain voxels only
    after = class_volumes_ml(model_lab, 0.001 * det, label_set)  # model voxels are 1 mm^3, scaled back to the scan's size
    qc["ml_after"] = after
    qc["volume_change_pct"] = [round(100.0 * (a - b) / b, 1) if b > 0 else None for a, b in zip(after, before)]
    return PreparedSubject(subj.id, LabeledImage(subj.id, model_img.astype(np.float32), model_lab), qc)


def prepare_subjects(subjects: Sequence[Subject], canvas: Sequence[int],
                     on_done: Optional[Callable[[PreparedSubject], None]] = None,
                     label_set: LabelSet = TISSUES) -> List[PreparedSubject]:
    """Prepare every subject (refusals included, never raised); `on_done` sees each as it finishes."""
    out = []
    for s in subjects:
        p = prepare_subject(s, canvas, label_set)
        if on_done is not None:
            on_done(p)
        out.append(p)
    return out


def qc_columns(label_set: LabelSet = TISSUES) -> tuple:
    """The QC table's columns: registration, then each label's volume before and after resampling."""
    names = ("cgm", "sgm", "wm", "csf") if label_set is TISSUES else tuple(lab.name for lab in label_set.labels[1:])
    return ("id", "status", "ncc", "ncc_interior") + tuple(f"{c}_ml_{w}" for c in names for w in ("before", "after")) \
        + ("max_change_pct", "reason")


def qc_row(p: PreparedSubject, label_set: LabelSet = TISSUES) -> Dict[str, object]:
    """The QC table's row for one subject (volumes before and after resampling, per label)."""
    columns = qc_columns(label_set)
    row: Dict[str, object] = {k: "" for k in columns}
    row.update(id=p.id, status="refused" if p.error else "ok", reason=p.error,
               ncc=p.qc.get("ncc", ""), ncc_interior=p.qc.get("ncc_interior", ""))
    names = [c[: -len("_ml_before")] for c in columns if c.endswith("_ml_before")]
    for i, c in enumerate(names):
        for w in ("before", "after"):
            vals = p.qc.get(f"ml_{w}")
            row[f"{c}_ml_{w}"] = vals[i] if vals else ""
    changes = [abs(x) for x in p.qc.get("volume_change_pct", []) if x is not None]
    row["max_change_pct"] = max(changes) if changes else ""
    return row


def qc_table(prepared: Sequence[PreparedSubject], label_set: LabelSet = TISSUES) -> str:
    """The QC table as tab-separated text, one row per subject (refused ones with their reason)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, qc_columns(label_set), delimiter="\t", lineterminator="\n")
    w.writeheader()
    w.writerows({k: "" if v is None else quote(str(v)) for k, v in qc_row(p, label_set).items()} for p in prepared)
    return buf.getvalue()

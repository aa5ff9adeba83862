"""`metaseg evaluate`: a model scored against reference labels, per label and per label-protocol group.

Each subject folder's image is segmented exactly as `metaseg segment` would (a `Segmenter`: 2D slices and
3D scans in any geometry, any label set) and its labels are compared with the folder's reference labels on
the image's own grid: Dice and absolute volume error (%) of every label, and their mean over the labels
present (fg-Dice). A finer label set (structures) is also merged into the 4 tissues and scored against the
same reference merged likewise. Subjects are grouped by label protocol (`data.label_group`: FreeSurfer's
labels in brains/, manual labels in oasis-nmm/) and each group is summarized on its own, since the
protocols disagree by a few Dice points.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import numpy as np
import SimpleITK as sitk

from .io.data import label_group, subject_dir
from .io.readers import InputError, read_image
from .labelsets import TISSUES, LabelSet, from_card
from .metrics import dice_per_class, foreground_dice
from .options import SegmentOptions
from .segmenter import Segmenter


def score(pred: np.ndarray, ref: np.ndarray, labels: LabelSet, cell: float) -> Dict[str, Any]:
    """Dice and absolute volume error (%) of each foreground label, fg-Dice over the labels present, and for a
    set finer than the tissues the tissue fg-Dice of both merged into the 4 tissues. `cell`: mL (or mm^2)
    per voxel."""
    if pred.shape != ref.shape:
        raise InputError(f"the labels ({pred.shape}) and the reference ({ref.shape}) differ in size: the reference "
                         "must lie on the image's grid")
    dice = dice_per_class(pred, ref, max(labels.values) + 1)
    counts_p, counts_r = (np.bincount(x.ravel(), minlength=256) for x in (pred, ref))
    row: Dict[str, Any] = {"fg_dice": foreground_dice(pred, ref, labels.foreground), "dice": {}, "volume_error_pct": {}}
    for lab in labels.labels[1:]:
        vp, vr = float(counts_p[lab.value]) * cell, float(counts_r[lab.value]) * cell
        row["dice"][lab.name] = dice[lab.value]
        row["volume_error_pct"][lab.name] = 100.0 * abs(vp - vr) / vr if vr else float("nan")
    if labels is not TISSUES:
        lut = np.asarray(labels.tissue_lut(), np.uint8)
        row["tissue_fg_dice"] = foreground_dice(lut[pred], lut[ref])
    return row


def evaluate(data: str, subjects: Sequence[str], segmenter: Segmenter, options: SegmentOptions, image: str,
             reference: str, on_row=None) -> List[Dict[str, Any]]:
    """Segment `<subject>/<image>` of every subject and score it against `<subject>/<reference>`."""
    rows = []
    for s in subjects:
        try:
            d = subject_dir(data, s)
        except FileNotFoundError as e:
            raise InputError(str(e)) from e
        for name in (image, reference):
            if not (d / name).is_file():
                raise InputError(f"subject {s}: no {name} in {d} (set --image / --reference)")
        img, ref_img = read_image(d / image), read_image(d / reference)
        if img.GetSize() != ref_img.GetSize():  # before the fit: no Dice of misaligned arrays
            raise InputError(f"subject {s}: {image} is {'x'.join(map(str, img.GetSize()))} voxels but {reference} "
                             f"is {'x'.join(map(str, ref_img.GetSize()))}: the reference must lie on the image's grid")
        t0 = time.perf_counter()
        seg = segmenter(img, steps=options.steps, seed=options.seed, quality=options.quality,
                        brain_extraction=options.brain_extraction, accept_poor_match=options.accept_poor_match)
        pred, ref = sitk.GetArrayFromImage(seg.labels), sitk.GetArrayFromImage(ref_img).astype(np.int64)
        if ref.size and (ref.min() < 0 or ref.max() > 255):
            raise InputError(f"subject {s}: {reference} holds values outside 0..255: not a label image")
        cell = float(np.prod(seg.labels.GetSpacing())) / (1000.0 if pred.squeeze().ndim == 3 else 1.0)
        row = {"subject": s, "group": label_group(d), **score(pred, ref.astype(np.uint8), from_card(seg.label_set), cell),
               "psnr_db": seg.report["fit"]["psnr_db"], "seconds": time.perf_counter() - t0, "warnings": seg.warnings,
               "weights": seg.report["weights"], "weights_sha256": seg.report["weights_sha256"]}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per label group: mean fg-Dice (and its lowest), tissue fg-Dice, and each label's mean Dice and
    volume error over the group's subjects (NaN where no subject has the label)."""
    out: Dict[str, Dict[str, Any]] = {}
    for g in sorted({r["group"] for r in rows}):
        sel = [r for r in rows if r["group"] == g]
        names = list(sel[0]["dice"])
        summary: Dict[str, Any] = {
            "n": len(sel), "fg_dice": _mean([r["fg_dice"] for r in sel]), "min_fg_dice": min(r["fg_dice"] for r in sel),
            "dice": {n: _mean([r["dice"][n] for r in sel]) for n in names},
            "volume_error_pct": {n: _mean([r["volume_error_pct"][n] for r in sel]) for n in names}}
        if "tissue_fg_dice" in sel[0]:
            summary["tissue_fg_dice"] = _mean([r["tissue_fg_dice"] for r in sel])
        out[g] = summary
    return out


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and not np.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def label_table(groups: Dict[str, Dict[str, Any]]) -> str:
    """One line per label: mean Dice and volume error (%) in each group (text, for the terminal)."""
    names = list(next(iter(groups.values()))["dice"])
    width = max(len(n) for n in names) + 1
    head = f"{'label':<{width}}" + "".join(f" {g[:12] + ' Dice':>17} {'vol.err %':>9}" for g in groups)
    lines = [head]
    for n in names:
        lines.append(f"{n:<{width}}" + "".join(f" {v['dice'][n]:17.3f} {v['volume_error_pct'][n]:9.1f}"
                                               for v in groups.values()))
    return "\n".join(lines)


def format_row(row: Dict[str, Any]) -> str:
    extra = f"  tissues {row['tissue_fg_dice']:.4f}" if "tissue_fg_dice" in row else ""
    return (f"{row['subject']:<12} {row['group']:<11} fg-Dice {row['fg_dice']:.4f}{extra}  PSNR {row['psnr_db']:5.1f}  "
            f"{row['seconds']:6.1f} s")

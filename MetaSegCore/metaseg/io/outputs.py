"""Result files besides the labelmap: preview PNG, Slicer `.seg.nrrd`, JSON report.

Writers here write to the path they are given; callers pass temporary paths through
`io.write_all` so that a run publishes all of its files or none.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .glyphs import draw_text
from ..labelsets import TISSUE_NAMES, from_card, terminology


def overlay_rgb(image: np.ndarray, labels: np.ndarray, colors: Dict[int, List[int]], alpha: float = 0.45) -> np.ndarray:
    """Grey image (robustly scaled) with coloured labels blended on top, uint8 (H, W, 3)."""
    img = np.asarray(image, np.float32)
    hi = np.percentile(img[img > 0], 99.5) if (img > 0).any() else 1.0
    grey = np.clip(img / (hi or 1.0), 0, 1)[..., None].repeat(3, -1)
    rgb = grey.copy()
    for value, col in colors.items():
        if value == 0:
            continue
        m = labels == value
        rgb[m] = (1 - alpha) * grey[m] + alpha * np.asarray(col, np.float32) / 255.0
    return (rgb * 255 + 0.5).astype(np.uint8)


def preview_panels(image: sitk.Image, labels: sitk.Image) -> List[Tuple[str, np.ndarray, np.ndarray, Tuple[str, str, str, str]]]:
    """(name, image, labels, (left, right, top, bottom) orientation letters) per preview panel.

    A volume gives axial, coronal and sagittal slices through the labelled tissue's centre, all in
    radiological convention (the patient's right on the picture's left; superior, resp. anterior, up)
    whatever the scan's voxel order, with voxels drawn at their physical aspect ratio. A slice is
    shown as stored (the aligned coronal slices of the 2D task are already radiological, superior up).
    """
    if image.GetDimension() == 2 or 1 in image.GetSize():
        arr, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels)
        shape = [s for s in arr.shape if s != 1]
        return [("coronal slice", arr.reshape(shape), lab.reshape(shape), ("", "", "", ""))]
    img = sitk.DICOMOrient(image, "LPS")  # voxel axes ~ (L, P, S): no interpolation, only flips and swaps
    lab = sitk.DICOMOrient(labels, "LPS")
    a, l = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab)  # (S, P, L)
    sx, sy, sz = img.GetSpacing()
    idx = np.argwhere(l > 0)
    k, j, i = idx.mean(0).round().astype(int) if len(idx) else np.array(l.shape) // 2
    views = [  # rows, columns of each view and their spacing (rows, cols)
        ("axial", a[k], l[k], (sy, sx), ("R", "L", "A", "P")),
        ("coronal", a[::-1, j], l[::-1, j], (sz, sx), ("R", "L", "S", "I")),
        ("sagittal", a[::-1, :, i], l[::-1, :, i], (sz, sy), ("A", "P", "S", "I")),
    ]
    return [(name, _isotropic(im, sp), _isotropic(lb, sp), letters) for name, im, lb, sp, letters in views]


def _isotropic(arr: np.ndarray, spacing: Tuple[float, float]) -> np.ndarray:
    """Nearest-neighbour resize of a 2D array so that its pixels are square (at the finer spacing)."""
    fine = min(spacing)
    rows, cols = (np.minimum((np.arange(int(round(n * s / fine))) * fine / s).astype(int), n - 1)
                  for n, s in zip(arr.shape, spacing))
    return arr[np.ix_(rows, cols)]


def write_preview(panels, label_info: List[Dict[str, Any]], path: Path, scale: int = 2) -> None:
    """PNG of the panels side by side (`preview_panels`), labels overlaid, each panel named and its
    sides marked with orientation letters, and a colour legend of the tissues underneath."""
    colors = {lab["value"]: lab["color"] for lab in label_info}
    tiles = [overlay_rgb(im, lb, colors).repeat(scale, 0).repeat(scale, 1) for _, im, lb, _ in panels]
    gap = 12 * scale  # room between panels for their side letters
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    text = 2 * scale if width >= 1000 else scale  # font scale: larger letters on the wide 3D picture
    line = 9 * text  # text line height
    height = max(t.shape[0] for t in tiles) + line
    legend = legend_entries(label_info)
    slot = (max(len(lab["name"]) for lab in legend) * 6 + 14) * text
    width = max(width, slot)  # a narrow slice still shows its longest label name whole
    per_row = max(1, width // slot)
    legend_rows = -(-len(legend) // per_row)
    out = np.zeros((height + legend_rows * line + text, width, 3), np.uint8)
    col = 0
    for (name, _, _, (left, right, top, bottom)), tile in zip(panels, tiles):
        h, w = tile.shape[:2]
        out[line : line + h, col : col + w] = tile
        draw_text(out, name, text, col + text, scale=text)
        mid_r, mid_c = line + h // 2 - 3 * text, col + w // 2 - 2 * text
        for letter, (r, c) in ((left, (mid_r, col + text)), (right, (mid_r, col + w - 6 * text)),
                               (top, (line + text, mid_c)), (bottom, (line + h - 8 * text, mid_c))):
            if letter:
                draw_text(out, letter, r, c, color=(255, 255, 0), scale=text)
        col += w + gap
    for n, lab in enumerate(legend):
        r, c = height + (n // per_row) * line + text, (n % per_row) * slot + text
        out[r : r + 7 * text, c : c + 7 * text] = lab["color"]
        draw_text(out, lab["name"], r, c + 9 * text, scale=text)
    sitk.WriteImage(sitk.GetImageFromArray(out, isVector=True), str(path))


def legend_entries(label_info: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The preview's legend: one entry per foreground colour and name. A left/right pair drawn in one
    colour is one entry without its side ("Hippocampus"), so 31 structures need 18 entries, not 31."""
    out: List[Dict[str, Any]] = []
    for lab in label_info:
        if lab["value"] == 0:
            continue
        name = str(lab["name"])
        base = name.split("-", 1)[1] if name.startswith(("Left-", "Right-")) else name
        twins = [x for x in label_info if x is not lab and x["value"] != 0 and str(x["name"]).endswith("-" + base)
                 and list(x["color"]) == list(lab["color"])]
        entry = {"value": lab["value"], "name": base if twins else name, "color": lab["color"]}
        if not any(e["name"] == entry["name"] and list(e["color"]) == list(entry["color"]) for e in out):
            out.append(entry)
    return out


def write_seg_nrrd(labels_img: sitk.Image, label_info: List[Dict[str, Any]], path: Path) -> None:
    """Slicer's native segmentation file: one segment per tissue with name, colour and terminology."""
    import slicerio  # imported here: only this output needs it

    arr = sitk.GetArrayFromImage(labels_img)  # (k, j, i)
    if arr.ndim == 2:
        arr = arr[None]
    voxels = np.ascontiguousarray(arr.transpose(2, 1, 0))  # slicerio wants (i, j, k)
    spacing = np.array(labels_img.GetSpacing() + (1.0,) * (3 - labels_img.GetDimension()))
    direction = np.eye(3)
    d = np.array(labels_img.GetDirection())
    n = labels_img.GetDimension()
    direction[:n, :n] = d.reshape(n, n)
    origin = np.zeros(3)
    origin[:n] = labels_img.GetOrigin()
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * spacing[None, :]
    ijk_to_lps[:3, 3] = origin
    segments = []
    labels = from_card(label_info)  # the label set's codes: cards written before label sets carry none
    for lab in label_info:
        if lab["value"] == 0:
            continue
        segments.append({
            "labelValue": lab["value"], "name": lab["name"], "color": [c / 255.0 for c in lab["color"]],
            "terminology": terminology(labels.by_value(int(lab["value"]))),
        })
    seg = {"voxels": voxels, "ijkToLPS": ijk_to_lps, "encoding": "gzip", "segments": segments}
    slicerio.write_segmentation(str(path), seg)


def class_sizes(labels: np.ndarray, spacing, label_info: List[Dict[str, Any]],
                fit_counts: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
    """Per-class pixel counts and physical size (mm^2 for 2D, mL for 3D). With `fit_counts` (fits, 256: each fit's
    own labels counted, `volume.VolumeResult`) a 3D class also gets each fit's volume and their spread."""
    counts = np.bincount(labels.ravel(), minlength=256)
    cell = float(np.prod(spacing))
    out = []
    for lab in label_info:
        n = int(counts[lab["value"]])
        entry = {"value": lab["value"], "name": lab["name"], "voxels": n}
        if len(spacing) == 2 or labels.ndim == 2 or 1 in labels.shape:
            entry["area_mm2"] = round(n * cell, 2)
        else:
            entry["volume_ml"] = round(n * cell / 1000.0, 3)
            if fit_counts is not None:
                per_fit = fit_counts[:, lab["value"]] * cell / 1000.0
                entry["volume_ml_fits"] = [round(float(v), 3) for v in per_fit]
                entry["spread_pct"] = spread_pct(per_fit)
        out.append(entry)
    return out


def spread_pct(volumes: Sequence[float]) -> float:
    """How far a volume moved between the run's fits: (largest - smallest) / mean, in %."""
    v = np.asarray(volumes, float)
    return round(float(100.0 * (v.max() - v.min()) / v.mean()), 2) if v.size and v.mean() > 0 else 0.0


# A hippocampal volume whose fits disagree by more than this (L+R, %) cannot show a year's atrophy (1-5 %),
# which is what a memory clinic reads it for.
HIPPOCAMPUS_SPREAD_LIMIT_PCT = 5.0
HIPPOCAMPI = ("Left-Hippocampus", "Right-Hippocampus")


def hippocampus_spread(classes: List[Dict[str, Any]]) -> Tuple[Optional[float], List[str]]:
    """The spread of the L+R hippocampal volume over the run's fits (None without fits or hippocampi) and the
    warning when it is too large for a clinic to use."""
    hip = [c["volume_ml_fits"] for c in classes if c["name"] in HIPPOCAMPI and "volume_ml_fits" in c]
    if len(hip) != len(HIPPOCAMPI):
        return None, []
    spread = spread_pct(np.sum(hip, axis=0))
    if spread <= HIPPOCAMPUS_SPREAD_LIMIT_PCT:
        return spread, []
    return spread, [f"the hippocampal volume (left + right) differs by {spread:.1f} % between this run's fits, more "
                    f"than a year's atrophy (1-5 %): do not compare it with another scan's; segment again with more "
                    f"fits (quality best) or check the scan's quality"]


def tissue_sums(classes: List[Dict[str, Any]], label_info: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The 4 tissue classes' sizes summed over the labels of `classes` (`class_sizes`) that belong to
    each: for a structures result, what a tissue model reports, from the same labels."""
    labels = from_card(label_info)
    key = "volume_ml" if classes and "volume_ml" in classes[0] else "area_mm2"
    out = []
    for tissue, name in TISSUE_NAMES.items():
        parts = [c for c in classes if c["value"] != 0 and labels.by_value(c["value"]).tissue == tissue]
        out.append({"value": tissue, "name": name, "voxels": sum(c["voxels"] for c in parts),
                    key: round(sum(c[key] for c in parts), 3)})
    return out


def hippocampus_ratio(classes: List[Dict[str, Any]], intracranial_ml: float) -> Dict[str, float]:
    """Left, right and total hippocampal volume as a fraction of the intracranial volume (brain mask):
    the normalized figure read in memory clinics. Empty without hippocampus labels."""
    hip = {c["name"]: c["volume_ml"] for c in classes if c["name"].endswith("-Hippocampus") and "volume_ml" in c}
    if not hip or intracranial_ml <= 0:
        return {}
    left, right = hip.get("Left-Hippocampus", 0.0), hip.get("Right-Hippocampus", 0.0)
    return {"left": round(left / intracranial_ml, 6), "right": round(right / intracranial_ml, 6),
            "total": round((left + right) / intracranial_ml, 6), "intracranial_ml": round(intracranial_ml, 1)}


def environment() -> Dict[str, str]:
    import torch

    from ..version import __version__

    return {"metaseg": __version__, "torch": torch.__version__, "SimpleITK": sitk.Version.VersionString(),
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform()}


def write_report(report: Dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

"""Result files besides the labelmap: preview PNG, Slicer `.seg.nrrd`, JSON report.

Writers here write to the path they are given; callers pass temporary paths through
`io.write_all` so that a run publishes all of its files or none.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import SimpleITK as sitk


# Codes of Slicer's terminology "Segmentation category and type - DICOM master list"
# (SegmentationCategoryTypeModifier-DICOM-Master.json, identical in Slicer 5.6-5.10; a copy is in
# Testing/slicer/data and a test checks every code against it): (category), (type) per label value
# as (scheme, code, meaning). The list has no subcortical grey matter: it is filed as grey matter
# (its segment name says which); cortex includes cerebellar cortex, white matter the brainstem.
TERMINOLOGY = {
    1: (("SCT", "123037004", "Anatomical Structure"), ("SCT", "40146001", "Cerebral cortex")),
    2: (("SCT", "123037004", "Anatomical Structure"), ("SCT", "389081007", "Gray Matter")),
    3: (("SCT", "123037004", "Anatomical Structure"), ("SCT", "389080008", "White Matter")),
    4: (("SCT", "123037004", "Anatomical Structure"), ("SCT", "65216001", "Cerebrospinal Fluid")),
}


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


def orthogonal_slices(image: np.ndarray, labels: np.ndarray) -> List[tuple]:
    """(image, labels) slice pairs through the labelled tissue's centre along each array axis of a volume."""
    idx = np.argwhere(labels > 0)
    centre = idx.mean(0).round().astype(int) if len(idx) else np.array(labels.shape) // 2
    return [(np.take(image, c, axis=ax), np.take(labels, c, axis=ax)) for ax, c in enumerate(centre)]


def write_preview(panels: List[np.ndarray], path: Path, scale: int = 2) -> None:
    """Side-by-side RGB panels (already oriented for display), enlarged `scale`x, as PNG."""
    h = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, h - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    row = np.concatenate(padded, axis=1).repeat(scale, 0).repeat(scale, 1)
    sitk.WriteImage(sitk.GetImageFromArray(row, isVector=True), str(path))


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
    for lab in label_info:
        if lab["value"] == 0:
            continue
        segments.append({
            "labelValue": lab["value"], "name": lab["name"], "color": [c / 255.0 for c in lab["color"]],
            "terminology": _terminology_dict(lab["value"]),
        })
    seg = {"voxels": voxels, "ijkToLPS": ijk_to_lps, "encoding": "gzip", "segments": segments}
    slicerio.write_segmentation(str(path), seg)


def _terminology_dict(value: int) -> Dict[str, Any]:
    category, kind = TERMINOLOGY[value]
    return {
        "contextName": "Segmentation category and type - DICOM master list",
        "category": list(category),
        "type": list(kind),
        "anatomicContextName": "Anatomic codes - DICOM master list",
    }


def class_sizes(labels: np.ndarray, spacing, label_info: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per-class pixel counts and physical size (mm^2 for 2D, mL for 3D)."""
    counts = np.bincount(labels.ravel(), minlength=len(label_info))
    cell = float(np.prod(spacing))
    out = []
    for lab in label_info:
        n = int(counts[lab["value"]])
        entry = {"value": lab["value"], "name": lab["name"], "voxels": n}
        if len(spacing) == 2 or labels.ndim == 2 or 1 in labels.shape:
            entry["area_mm2"] = round(n * cell, 2)
        else:
            entry["volume_ml"] = round(n * cell / 1000.0, 3)
        out.append(entry)
    return out


def environment() -> Dict[str, str]:
    import torch

    from . import __version__

    return {"metaseg": __version__, "torch": torch.__version__, "SimpleITK": sitk.Version.VersionString(),
            "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform()}


def write_report(report: Dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

"""Size and fidelity of the stored fitted network ("metaseg-fitted/2", metaseg/space/fitted.py) on the bundled scan.

Segments the sample (ecog_t1.nii.gz by default, its reference labels ecog_seg4.nii.gz) once, keeps the fitted
volume in memory at full precision (float32 parameters, float32 image), stores it the way `--save-inr` and the
Slicer scene do, reads it back, and compares what both give:
- labels on the scan's own brain voxels, on README's oblique plane (coronal tilted 20/0/10 degrees, 0.25 mm:
  4x super-resolution) and on an axial plane through the centre (0.25 mm);
- agreement: mean over the foreground classes of the Dice between the two labelings (1.0 = identical);
- each one's mean foreground Dice against the reference labels (on the scan's voxels);
- the file's bytes (and per part: parameters, mask, image, header) and its text in the Slicer scene (characters:
  MetaSegLib.fitted's base85 text; base64, as MetaSeg 0.5 kept it, for comparison).

  PYTHONPATH=MetaSegCore .venv/bin/python benchmarks/fitted_storage.py [--labels tissues|structures] [--json OUT]
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "MetaSegSlicer"))  # MetaSegLib.fitted: the scene's text (no Qt, no MRML)


def dice(a: np.ndarray, b: np.ndarray, classes) -> float:
    scores = [2 * np.sum((a == c) & (b == c)) / (np.sum(a == c) + np.sum(b == c)) for c in classes
              if np.sum(a == c) + np.sum(b == c) > 0]
    return float(np.mean(scores))


def parts(data: bytes) -> dict:
    """Bytes per part of a fitted file: parameters, mask, image, header (JSON) and the rest."""
    from metaseg.io.safefile import loads

    tensors, _ = loads(data, "benchmark")
    out = {"header": int.from_bytes(data[:8], "little") + 8}
    for name, t in tensors.items():
        key = "parameters" if name.startswith("param/") else name
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def main() -> int:
    import torch

    import metaseg
    from metaseg.space.fitted import FittedVolume
    from metaseg.space.reslice import reslice, standard_plane
    from metaseg.space.volume import voxel_points
    from MetaSegLib import fitted as scene_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--image", default=str(ROOT / "Resources/Sample/ecog_t1.nii.gz"))
    ap.add_argument("--reference", default=str(ROOT / "Resources/Sample/ecog_seg4.nii.gz"))
    ap.add_argument("--labels", default="tissues")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    seg = metaseg.segment(a.image, labels=a.labels, device="cpu")
    full = seg.fitted
    data = full.to_bytes()
    stored = FittedVolume.from_bytes(data)
    scan = sitk.ReadImage(a.image)
    arr = sitk.GetArrayFromImage(scan).reshape(-1)
    flat = np.flatnonzero(arr > 0)
    points = voxel_points(scan, flat)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(a.reference)).reshape(-1)[flat]
    classes = [v for v in full.inr.model.config.values if v > 0]
    planes = {"oblique_coronal_20_0_10_0.25mm": standard_plane(full.info["reference"], "coronal", 0.25, (20, 0, 10)),
              "axial_centre_0.25mm": standard_plane(full.info["reference"], "axial", 0.25)}
    out = {"image": a.image, "labels": a.labels, "weights_sha256": full.info.get("weights_sha256"),
           "bytes": len(data), "scene_chars": len(scene_text.encode_bytes(data)),
           "base64_chars": len(base64.b64encode(data)), "parts_bytes": parts(data), "voxels": {}, "planes": {}}
    a_lab, b_lab = full.query(points), stored.query(points)
    out["voxels"] = {"agreement_dice": dice(a_lab, b_lab, classes), "differing_fraction": float(np.mean(a_lab != b_lab)),
                     "dice_vs_reference_full": dice(a_lab, ref, classes), "dice_vs_reference_stored": dice(b_lab, ref, classes)}
    for name, plane in planes.items():
        pa = sitk.GetArrayFromImage(reslice(full, plane)).ravel()
        pb = sitk.GetArrayFromImage(reslice(stored, plane)).ravel()
        out["planes"][name] = {"pixels": int(pa.size), "agreement_dice": dice(pa, pb, classes),
                               "differing_fraction": float(np.mean(pa != pb))}
    out["seconds"] = time.time() - t0
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
